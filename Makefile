# lm_lab — `make help` lists the targets. Everything runs inside ./.venv (created on first use).
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup train test test-slow test-all lint format bench clean
.DEFAULT_GOAL := help

help:  ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first: 2.13.0 is a CPU build on this machine's disk; other versions may pull multi-GB CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install lm_lab with its dev tools

train: $(STAMP)  ## the default run: a small GPT on Python's own docs (offline, a few minutes); ARGS="..." for overrides
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)  ## the test suite (under ~10 minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q --durations=12

test-slow: $(STAMP)  ## the long end-to-end runs (recipes, full default run)
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)  ## ruff fix + format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: $(STAMP)  ## benchmarks (print tables; see docs/benchmarks.md)
	$(BIN)/python bench/shakespeare_char.py
	$(BIN)/python bench/bert_speed.py

clean:  ## remove the venv, caches and run logs
	rm -rf $(VENV) .cache logs outputs multirun .pytest_cache .ruff_cache
