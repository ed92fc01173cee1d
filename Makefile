# One command each: `make quickstart` sets up and runs the main job, `make test` sets up and
# runs lint plus the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The verified MNIST copies beside a checkout of this workplace; elsewhere leaksim searches
# LEAKSIM_DATA_DIR, then ~/.cache/leaksim, then downloads.
SHARED_DATA := $(wildcard ../shared/data)
ifneq ($(SHARED_DATA),)
export LEAKSIM_DATA_DIR ?= $(abspath $(SHARED_DATA))
endif

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
	$(BIN)/pytest -q -n 2 --dist loadfile

quickstart: setup
	$(BIN)/leaksim run quickstart

bench: setup
	$(BIN)/python -m benchmarks.bench_engine

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
