# Two commands do everything on a fresh machine:
#   make demo   -> venv + install + synthetic data + CV training + bundle + evaluation
#   make test   -> venv + install + the fast test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: setup lint demo test test-compat test-slow test-all venv39 clean bench

setup:
	@bash scripts/setup.sh

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

demo: setup
	@bash scripts/demo.sh $(DEMO)

# Python 3.9 + torch 2.0.1: the platform's environment, for the `compat` tests.
venv39:
	@bash scripts/setup_py39.sh

test-compat: setup venv39
	$(PY) -m pytest -m compat $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Every tier this machine supports: fast + slow, compat when .venv39 exists (skipped with the
# reason otherwise), gpu where CUDA exists (skipped with the reason otherwise).
test-all: setup
	@if [ -x .venv39/bin/python ]; then echo "tiers: fast + slow + compat (.venv39)"; \
	else echo "tiers: fast + slow (no .venv39: compat skipped; make venv39 adds it)"; fi
	$(PY) -m pytest -m "compat or not compat" $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
