# tuneloop: `make demo` and `make test` work on a fresh clone (Python 3.11 on PATH).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
EXAMPLE := examples/sms_spam
PYTEST_ARGS ?=

.PHONY: install install-dev demo demo-drift test test-fast compile clean services rehearsal

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster]"
	touch $@

install: $(STAMP)  ## create .venv and install tuneloop

install-dev: $(DEV_STAMP)  ## also install what the tests need

demo: $(STAMP)  ## run the whole training pipeline locally on the SMS spam example
	$(BIN)/tuneloop run --local --config $(EXAMPLE)/tuneloop.yaml
	$(BIN)/tuneloop models list --config $(EXAMPLE)/tuneloop.yaml

test: services $(DEV_STAMP)  ## run the test suite (installs PostgreSQL and Redis first when missing)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)  ## the tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo-drift: $(STAMP)  ## after `make demo`: serve in-distribution then campaign traffic, monitor, retrain once
	$(BIN)/python benchmarks/drift.py --demo --config $(EXAMPLE)/tuneloop.yaml

CLUSTER_CONFIG := k8s/base/config/tuneloop.yaml

compile: $(STAMP)  ## compile both shipped pipelines with the cluster config of k8s/ to KFP IR YAML under build/
	$(BIN)/tuneloop compile training --output build/training.yaml --config $(CLUSTER_CONFIG)
	$(BIN)/tuneloop compile monitoring --output build/monitoring.yaml --config $(CLUSTER_CONFIG)

REHEARSAL_STAMP := $(VENV)/.installed-rehearsal
REHEARSAL_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(REHEARSAL_STAMP): pyproject.toml $(DEV_STAMP)
	touch $@

services:  ## install PostgreSQL and Redis from the Debian packages when missing (the rehearsal and service tests need them)
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then \
		echo "installing postgresql and redis-server with apt-get"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql redis-server; \
	fi

rehearsal: services $(REHEARSAL_STAMP)  ## the cluster on one machine: real Postgres, Redis, S3, MLflow; every step its own pod; checks the guarantees
	$(BIN)/python -m rehearsal $(REHEARSAL_ARGS)

clean:
	rm -rf .tuneloop build
