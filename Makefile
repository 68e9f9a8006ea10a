# medops: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medops-setup
# The embedded Triton's own environment (NumPy 1: its Python-backend stub needs it; medops runs
# NumPy 2): medops.serving.server looks for it beside $(VENV), named $(VENV)-triton.
TRITON_VENV := $(VENV)-triton
TRITON_STAMP := $(TRITON_VENV)/.medops-setup
PYTEST_ARGS ?=

.PHONY: setup demo quality quality-deploy test test-long test-fast down repro

## setup: create or update the virtual environments (.venv, and .venv-triton for the embedded
## Triton) with pinned versions
setup: $(STAMP) $(TRITON_STAMP)
	@command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null \
	  || echo "note: the browser tests (Data Docs, Prefect UI) are skipped without Chromium: sudo apt-get install -y chromium chromium-driver"

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[test]"
	@touch $(STAMP)

$(TRITON_STAMP): pyproject.toml requirements-triton.lock
	@test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.lock
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps -e .
	@touch $(TRITON_STAMP)

## demo: supervised servers + the export; events drive ingest -> train -> gate -> Triton; leaves servers up
demo: setup
	$(VENV)/bin/medops demo

## quality: the recipe (benchmarks/quality/params-quality.yaml) with 5 seeds through the pipeline's
## stages on the official split, scored through each exported model; per seed and mean +- sd, and
## the served 5-seed ensemble built from them
quality: setup
	$(PY) benchmarks/quality/seeds.py

## quality-deploy: the recipe (one seed) through the Prefect flow, deployed to Triton through the gate
quality-deploy: setup
	$(PY) benchmarks/quality/run_quality.py

## down: stop what `make demo` started (supervisord and its services; anything else by recorded pid)
down:
	@if [ -x $(VENV)/bin/medops ]; then $(VENV)/bin/medops down; else echo "nothing to stop (no .venv)"; fi

## test: the test suite (unit, contract, integration, end to end) but the tests marked long
test: setup
	$(PY) -m pytest -m "not long" $(PYTEST_ARGS)

## test-long: only the tests marked long (about 25 min on 2 cores: see README, Tests)
test-long: setup
	$(PY) -m pytest -m long $(PYTEST_ARGS)

## test-fast: everything but the tests marked slow
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## repro: reproduce the pipeline with DVC (same stages, same code, params.yaml)
repro: setup
	source $(VENV)/bin/activate && medops recover && dvc repro
