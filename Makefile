# One command each: `make quickstart` sets up and runs the main job, `make test` sets up and
# runs lint plus the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint quickstart bench clean

$(BIN)/leaksim: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU wheel, so nothing below can pull a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(BIN)/leaksim

setup: $(BIN)/leaksim

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

quickstart: setup
	$(BIN)/leaksim run quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
