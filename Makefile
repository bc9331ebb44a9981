# The two set-up commands of the README: `make demo` (install, prepare the model, build the demo index,
# serve it) and `make test` (install with test tools, run the whole suite). The Dockerfile runs the same
# `make install` steps.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,export

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable ".[$(EXTRAS)]"

demo: install
	$(BIN)/xmodal demo

test:
	$(MAKE) install EXTRAS=cpu,export,dev
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check . && $(BIN)/lint-imports

bench:
	$(BIN)/python bench/foundation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
