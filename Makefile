# The two set-up commands of the README: `make quickstart` (main job) and `make test` (lint, then every test,
# in random order; CI runs it). `make test-fast` skips the tests marked slow.
# Each creates .venv and installs the package with every extra on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-fast lint benchmark benchmark-peers

$(VENV)/.installed: pyproject.toml examples/runtime_plugin/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,test]" -e examples/runtime_plugin
	touch $@

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

benchmark: $(VENV)/.installed
	$(PY) -m benchmarks

# MLServer, KServe and `mlflow models serve` under the same load as ours (installs the first two
# into venvs of their own under benchmarks/.cache/peers on first use).
benchmark-peers: $(VENV)/.installed
	$(PY) -m benchmarks --only peers
