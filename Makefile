# The two set-up commands of the README: `make quickstart` (main job) and `make test` (lint, then every test,
# in random order; CI runs it). `make test-fast` skips the tests marked slow.
# Each creates .venv and installs the package with every extra on first use.
# `make test-old-python` checks the device side on Debian 12's own Python (3.11.2, no tarfile.data_filter):
# it builds $(OLD_VENV) from $(OLD_PYTHON) (apt-get installs python3 and python3-venv if they are missing)
# with only the device side in it; `make test` builds it too, for tests/test_old_python.py.
VENV ?= .venv
PY := $(VENV)/bin/python
OLD_PYTHON ?= /usr/bin/python3
OLD_VENV ?= .venv-old-python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: quickstart test test-fast test-old-python old-python lint benchmark

$(VENV)/.installed: pyproject.toml examples/runtime_plugin/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,test]" -e examples/runtime_plugin
	touch $@

# onnxruntime<1.24: the last releases that follow ONNX external data outside the model directory,
# so tests/test_old_python.py also shows the server refusing such models by itself.
$(OLD_VENV)/.installed: pyproject.toml
	$(OLD_PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3 python3-venv; }
	$(OLD_PYTHON) -m venv --clear $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet -e ".[server,onnx]" "onnxruntime<1.24"
	touch $@

old-python: $(OLD_VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) examples/quickstart.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint $(OLD_VENV)/.installed
	ARACHNE_OLD_PYTHON_VENV=$(OLD_VENV) $(PY) -m pytest

test-old-python: $(VENV)/.installed $(OLD_VENV)/.installed
	ARACHNE_OLD_PYTHON_VENV=$(OLD_VENV) $(PY) -m pytest -p no:randomly tests/test_old_python.py

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

benchmark: $(VENV)/.installed
	$(PY) -m benchmarks
