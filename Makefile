# The two set-up commands of the README: `make demo` (install, prepare the model, build the demo index,
# serve it) and `make test` (install with test tools, run the whole suite). The Dockerfile runs the same
# `make install` steps.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,export

.PHONY: install browser demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --editable ".[$(EXTRAS)]"

demo: install
	$(BIN)/xmodal demo

# The search page's tests drive Debian's Chromium (chromium + chromium-driver; nothing downloads a browser build).
# Installed where apt-get runs as root (this project's CI machines); elsewhere those tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium and chromium-driver for the browser tests ..."; \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
	  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
	  || echo "could not install chromium: the browser tests will skip"; \
	else echo "no chromium, and apt-get cannot run here: the browser tests will skip"; fi

# clip-retrieval without its dependencies (torch, flask, faiss, ...): the tests use only its clip_client.py.
CLIP_RETRIEVAL ?= clip-retrieval==2.45.0

test: browser
	$(MAKE) install EXTRAS=cpu,export,dev
	$(BIN)/python -m pip install --quiet --no-deps "$(CLIP_RETRIEVAL)"
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check . && $(BIN)/lint-imports

bench:
	$(BIN)/python bench/foundation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
