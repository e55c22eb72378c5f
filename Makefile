# Two commands on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT ?= output/demo
CONFIG ?= configs/demo.yaml
RAY_ADDRESS ?= http://127.0.0.1:8265
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast submit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/adapters run --config configs/demo.yaml --output $(OUTPUT)
	@echo "Report: $(OUTPUT)/report/summary.html  (and summary.md, summary.json)"

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Submit the whole pipeline as a Ray job:  make submit CONFIG=configs/default.yaml OUTPUT=s3://bucket/prefix RAY_ADDRESS=http://head:8265
submit: venv
	RAY_ADDRESS=$(RAY_ADDRESS) $(BIN)/python -m jobs.submit --config $(CONFIG) --output $(OUTPUT)

clean:
	rm -rf output .pytest_cache
