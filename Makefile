# The two set-up commands of the README: `make quickstart` (main job) and `make test`.
# Each creates .venv and installs the package with every extra on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test benchmark

$(VENV)/.installed: pyproject.toml examples/runtime_plugin/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,test]" -e examples/runtime_plugin
	touch $@

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest

benchmark: $(VENV)/.installed
	$(PY) -m benchmarks
