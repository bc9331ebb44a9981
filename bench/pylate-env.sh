#!/usr/bin/env bash
# Create bench/.pylate-venv: PyLate's own environment for bench/late.py (it runs bench/pylate_runner.py there).
#
# Why these pins: pylate 1.6.0 needs fast-plaid <= 1.4.6.2110, and fast-plaid's wheels are compiled against one
# torch release each (the last digits: 2110 = torch 2.11.0, which it requires with ==). No CPU build of torch
# 2.11.0 is reachable from PyPI, so this installs PyPI's torch 2.11.0 with its CUDA 13 libraries (a few GB in the
# venv; it runs on the CPU here). torch 2.13.0 (the CPU build on set-up machines) has no matching fast-plaid wheel.
# Voyager is PyLate's HNSW index (the `voyager` extra), pinned to 2.1.0: PyLate 1.6.0 hands add_items a list of
# vectors, which voyager 2.2 no longer accepts (it wants one float32 ndarray).
# The torch cap in /etc/xdg/pip (torch<=2.14.1) admits 2.11.0.
#
# Usage: bash bench/pylate-env.sh [PYTHON]   (default python3.11, else python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.pylate-venv"
PY="${1:-$(command -v python3.11 || command -v python3)}"

TORCH="torch==2.11.0"
PYLATE="pylate[voyager]==1.6.0"
FAST_PLAID="fast-plaid==1.4.6.2110"
VOYAGER="voyager==2.1.0"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, alone, so nothing else can choose another release; then the rest under a constraint that keeps it.
"$VENV/bin/python" -m pip install "$TORCH"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -m pip freeze | grep -iE '^(torch|nvidia-|cuda-|triton)' >"$CONSTRAINTS"
"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "$PYLATE" "$FAST_PLAID" "$VOYAGER"
"$VENV/bin/python" - <<'EOF'
import fast_plaid, pylate, torch, voyager  # noqa: F401
from importlib.metadata import version

from pylate import indexes  # noqa: F401

print("pylate", version("pylate"), "fast-plaid", version("fast-plaid"), "torch", torch.__version__,
      "voyager", version("voyager"), "cuda available:", torch.cuda.is_available())
EOF
echo "ready: $VENV"
