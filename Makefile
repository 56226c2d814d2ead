# mlxcluster — `make run` sets everything up and starts the dual cluster; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_DIR ?= $(HOME)/.cache/mlxcluster/models
export MLXCLUSTER_MODELS_DIR := $(MODELS_DIR)
PYTEST_ARGS ?=
PLUGINS ?=
PYZ := mlxcluster.pyz

.PHONY: run test lint setup model openblas chromium bench clean help

help:
	@echo "make run    set up (venv, deps, demo model), build $(PYZ) if stale and start its dual cluster on 127.0.0.1:8080"
	@echo "make pyz    build the $(PYZ) zipapp if stale (PLUGINS=\"plugins/a plugins/b\" bundles plugin packages)"
	@echo "make lint   ruff check, ruff format --check and mypy --strict"
	@echo "make test   set up, lint and run the test suite"
	@echo "make bench  run the benchmarks"

# The plugin packages in plugins/ are installed (editable) too, so their entry points are registered and
# their tests (collected from plugins/ by pytest) run with the suite.
DEV_PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mlxcluster needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(addprefix -e ,$(DEV_PLUGINS))
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

# The dashboard test drives a real headless Chromium (skipped without one, except in CI where CI is set).
chromium:
	@if [ "$$(uname -s)" = Linux ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (the dashboard test's browser)"; \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)) || \
	    echo "warning: could not install chromium; the dashboard browser test will not run"; \
	  else \
	    echo "hint: 'sudo apt-get install chromium' lets the dashboard browser test run"; \
	  fi; \
	fi

model: setup
	$(VENV)/bin/mlxcluster models demo

run: model $(PYZ)
	$(PYTHON) $(PYZ) run --mode dual

# The zipapp, for the Python of the venv. Rebuilt when pyproject.toml, src/, the build script or a bundled
# plugin changed, or PLUGINS did (build/staging/plugins.txt is rewritten only when the list changes).
.PHONY: pyz FORCE
PYZ_INPUTS := pyproject.toml build/build_pyz.py build/preamble.py $(shell find src $(PLUGINS) -type f \
	! -path '*/__pycache__/*' ! -path '*.egg-info/*' ! -path '*/build/*' ! -path '*/.venv/*' 2>/dev/null)
PYZ_PLUGINS_STAMP := build/staging/plugins.txt

pyz: $(PYZ)

$(PYZ): $(STAMP) $(PYZ_INPUTS) $(PYZ_PLUGINS_STAMP)
	$(PY) build/build_pyz.py --output $@ $(PLUGINS)

$(PYZ_PLUGINS_STAMP): FORCE
	@mkdir -p $(@D); [ -f $@ ] && [ "$$(cat $@)" = "$(strip $(PLUGINS))" ] || echo "$(strip $(PLUGINS))" > $@

# Lint, format and strict types over src/ and plugins/; `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check src plugins tests
	$(VENV)/bin/ruff format --check src plugins tests
	$(VENV)/bin/mypy

# Coverage counts the processes the tests start too (see [tool.coverage.run] in pyproject.toml); the total is
# printed and a run below [tool.coverage.report] fail_under fails.
# pytest itself runs on the system OpenBLAS where there is one, as workers do (tests/conftest.py keeps it out of
# the processes the tests start): the in-process model tests run ~5x faster than on mlx-cpu's bundled BLAS.
# Single-threaded there: OpenBLAS's threads make fork() (the tests start nats-servers and workers) wait in its
# atfork handler, which hung a run for good once; the processes started get their own setting back.
OPENBLAS_PRELOAD = $(shell $(PY) -c 'from mlxcluster.worker.blas import openblas_path; print(openblas_path() or "")')
WITH_OPENBLAS = $(if $(OPENBLAS_PRELOAD),LD_PRELOAD=$(OPENBLAS_PRELOAD)$(if $(LD_PRELOAD),:$(LD_PRELOAD)) \
  OPENBLAS_NUM_THREADS=1 MLXCLUSTER_TEST_BLAS_THREADS="$(OPENBLAS_NUM_THREADS)")

test: lint model chromium
	@rm -f .coverage .coverage.*
	$(WITH_OPENBLAS) $(PY) -m pytest --cov --cov-report=term $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-mlx-lm-floor

# The engine's tests again on the oldest mlx-lm that pyproject.toml admits, when pip installed a newer one:
# that release is unpacked into build/mlx-lm-floor and put first on the path (nothing else changes).
MLX_LM_FLOOR = $(shell sed -n 's/.*"mlx-lm>=\([0-9.]*\),.*/\1/p' pyproject.toml)
ENGINE_TESTS ?= tests/test_families_engine.py tests/test_engine_faults.py tests/test_tool_formats.py
.PHONY: test-mlx-lm-floor
test-mlx-lm-floor: $(STAMP)
	@installed=$$($(PY) -c 'import importlib.metadata as m; print(m.version("mlx-lm"))'); \
	if [ "$$installed" = "$(MLX_LM_FLOOR)" ]; then \
	  echo "mlx-lm $$installed is the floor of the range: the suite above covered it"; \
	else \
	  echo "mlx-lm $$installed installed; the engine tests again on the floor, $(MLX_LM_FLOOR)"; \
	  [ -f build/mlx-lm-floor/.version-$(MLX_LM_FLOOR) ] || { rm -rf build/mlx-lm-floor && \
	    $(PY) -m pip install --quiet --no-deps --target build/mlx-lm-floor "mlx-lm==$(MLX_LM_FLOOR)" && \
	    touch build/mlx-lm-floor/.version-$(MLX_LM_FLOOR); } && \
	  PYTHONPATH=build/mlx-lm-floor $(WITH_OPENBLAS) $(PY) -m pytest -q -p no:cacheprovider $(ENGINE_TESTS) && \
	  PYTHONPATH=build/mlx-lm-floor $(PY) -c 'import mlx_lm; assert mlx_lm.__version__ == "$(MLX_LM_FLOOR)", mlx_lm.__version__'; \
	fi

# The model-family fixtures (tests/families.py: tiny offline model dirs built from the demo model's tokenizer)
# that the issue-19 benchmarks run on are built first, in a second or so each.
SOAK_MINUTES ?= 10
FAMILIES_DIR ?= $(HOME)/.cache/mlxcluster/families
bench: model
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -qq wrk >/dev/null 2>&1; } || echo "hint: install wrk for the cluster load figures"
	$(PY) tests/families.py $(FAMILIES_DIR)
	$(PY) tests/embedding_model.py $(FAMILIES_DIR)
	$(VENV)/bin/mlxcluster bench report --soak-minutes $(SOAK_MINUTES) --families-dir $(FAMILIES_DIR)

clean:
	rm -rf $(VENV) build/site-packages build/staging mlxcluster*.pyz $(HOME)/.shiv/mlxcluster*.pyz_*
