# Two commands do everything on a fresh machine:
#   make demo   -> venv + install + synthetic data + CV training + bundle + evaluation
#   make test   -> venv + install + the fast test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-compat test-slow venv39 clean bench

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	@bash scripts/demo.sh $(DEMO)

# Python 3.9 + torch 2.0.1: the platform's environment, for the `compat` tests.
venv39:
	@bash scripts/setup_py39.sh

test-compat: setup venv39
	$(PY) -m pytest -m compat $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache build *.egg-info
