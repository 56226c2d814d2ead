# mlxcluster — `make run` sets everything up and starts the dual cluster; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_DIR ?= $(HOME)/.cache/mlxcluster/models
export MLXCLUSTER_MODELS_DIR := $(MODELS_DIR)
PYTEST_ARGS ?=

.PHONY: run test setup model openblas bench clean help

help:
	@echo "make run    set up (venv, deps, demo model) and start the dual cluster on 127.0.0.1:8080"
	@echo "make test   set up and run the test suite"
	@echo "make bench  run the benchmarks"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mlxcluster needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) openblas

# On Linux the CPU fast path needs the system OpenBLAS (MLX's bundled BLAS is ~40x slower).
openblas:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread (CPU fast path)"; \
	    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq libopenblas0-pthread >/dev/null)) || \
	    echo "warning: could not install libopenblas0-pthread; workers will run slower"; \
	  else \
	    echo "hint: 'sudo apt-get install libopenblas0-pthread' makes CPU workers several times faster"; \
	  fi; \
	fi

model: setup
	$(VENV)/bin/mlxcluster models demo

run: model
	$(VENV)/bin/mlxcluster run --mode dual

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model
	$(VENV)/bin/mlxcluster bench nats

clean:
	rm -rf $(VENV) build/site-packages build/staging mlxcluster*.pyz
