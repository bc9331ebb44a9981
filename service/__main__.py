"""`python -m service` is the `xmodal` command."""

from service.cli import main

main()
