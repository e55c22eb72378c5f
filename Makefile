# Two commands on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUTPUT ?= output/demo
CONFIG ?= configs/demo.yaml
RAY_ADDRESS ?= http://127.0.0.1:8265
PYTEST_ARGS ?=
# `make demo` installs the runtime only; `make venv` / `make test` add the [dev] extra (test tools, the tracking
# and OpenAI clients, lm-evaluation-harness through [harness]). Both with constraints.txt: the versions tested
# together. GPU machines: EXTRAS=gpu.
# A driver older than 580 (CUDA 12): TORCH_INDEX=https://download.pytorch.org/whl/cu128 installs torch's
# CUDA 12 build of the same version first (docs/CLUSTER.md, "GPU installs").
EXTRAS ?=
TORCH_INDEX ?=
comma := ,
PIP_INSTALL = $(BIN)/pip install -q -c constraints.txt

.PHONY: venv demo test test-fast test-gpu-image serve submit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the dependency list or the tested versions change.
$(VENV)/.installed-runtime: pyproject.toml constraints.txt | $(BIN)/python
	$(if $(TORCH_INDEX),$(PIP_INSTALL) "torch==$$(sed -n 's/^torch==//p' constraints.txt)" --index-url $(TORCH_INDEX))
	$(PIP_INSTALL) -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-runtime
	$(PIP_INSTALL) -e '.[dev$(if $(EXTRAS),$(comma)$(EXTRAS))]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed-runtime
	$(BIN)/adapters run --config configs/demo.yaml --output $(OUTPUT)
	@echo "Report: $(OUTPUT)/report/summary.html  (and summary.md, summary.json)"

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The GPU image (containers/Dockerfile) built with podman up to where CUDA is needed (~6 GB of wheels)
test-gpu-image: venv
	$(BIN)/python -m pytest --gpu-image tests/integration/test_container.py -k gpu_image $(PYTEST_ARGS)

# Serve every domain's adapter of OUTPUT (after make demo): OpenAI API at http://127.0.0.1:8000/v1
serve: $(VENV)/.installed-runtime
	$(BIN)/adapters serve --output $(OUTPUT)

# Submit the whole pipeline as a Ray job:  make submit CONFIG=configs/default.yaml OUTPUT=s3://bucket/prefix RAY_ADDRESS=http://head:8265
submit: venv
	RAY_ADDRESS=$(RAY_ADDRESS) $(BIN)/python -m jobs.submit --config $(CONFIG) --output $(OUTPUT)

clean:
	rm -rf output .pytest_cache
