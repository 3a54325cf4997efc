# tuneloop: `make demo` and `make test` work on a fresh clone (Python 3.11 on PATH).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
EXAMPLE := examples/sms_spam
PYTEST_ARGS ?=

.PHONY: install install-dev demo demo-drift test test-fast compile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)  ## create .venv and install tuneloop

install-dev: $(DEV_STAMP)  ## also install what the tests need

demo: $(STAMP)  ## run the whole training pipeline locally on the SMS spam example
	$(BIN)/tuneloop run --local --config $(EXAMPLE)/tuneloop.yaml
	$(BIN)/tuneloop models list --config $(EXAMPLE)/tuneloop.yaml

test: $(DEV_STAMP)  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)  ## the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo-drift: $(STAMP)  ## after `make demo`: serve in-distribution then campaign traffic, monitor, retrain once
	$(BIN)/python benchmarks/drift.py --demo --config $(EXAMPLE)/tuneloop.yaml

CLUSTER_CONFIG := k8s/base/config/tuneloop.yaml

compile: $(STAMP)  ## compile both shipped pipelines with the cluster config of k8s/ to KFP IR YAML under build/
	$(BIN)/tuneloop compile training --output build/training.yaml --config $(CLUSTER_CONFIG)
	$(BIN)/tuneloop compile monitoring --output build/monitoring.yaml --config $(CLUSTER_CONFIG)

clean:
	rm -rf .tuneloop build
