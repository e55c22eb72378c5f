# Two commands on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT ?= output/demo
CONFIG ?= configs/demo.yaml
RAY_ADDRESS ?= http://127.0.0.1:8265
PYTEST_ARGS ?=
# GPU machines: EXTRAS=dev,gpu. A driver older than 580 (CUDA 12): TORCH_INDEX=https://download.pytorch.org/whl/cu128
# installs torch's CUDA 12 build of the same pinned version first (docs/CLUSTER.md, "GPU installs").
EXTRAS ?= dev
TORCH_INDEX ?=

.PHONY: venv demo test test-fast submit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH_INDEX),$(BIN)/pip install -q "torch==$$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)" --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
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
