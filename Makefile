# Two commands on a fresh machine (Python 3.11, pip; no GPU needed):
#   make quickstart   create .venv, install dparallel, run the quickstart
#   make test         lint and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test lint format

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/dparallel quickstart

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
