# The two set-up commands of the README: `make quickstart` (main job) and `make test` (lint, then every test,
# in random order; CI runs it). `make test-fast` skips the tests marked slow.
# Each creates .venv and installs the package with every extra on first use; `make test` also installs the
# system packages the tests need (`make system-deps`) and builds $(OLD_VENV) for tests/test_old_python.py:
# the device side on Debian 12's own Python ($(OLD_PYTHON), 3.11.2, no tarfile.data_filter), which
# `make test-old-python` checks alone, and $(TFLITE_VENV), a device with LiteRT alone (tests/test_variants_fleet.py).
VENV ?= .venv
PY := $(VENV)/bin/python
OLD_PYTHON ?= /usr/bin/python3
OLD_VENV ?= .venv-old-python
# The TFLite-only device of tests/test_variants_fleet.py (a fleet whose devices each run another variant).
TFLITE_VENV ?= .venv-tflite

.PHONY: quickstart test test-fast test-old-python old-python tflite-device lint benchmark benchmark-peers system-deps grpc-stubs

$(VENV)/.installed: pyproject.toml examples/runtime_plugin/pyproject.toml
	@echo "make: first use: installing arachne-mlflow with every extra into $(VENV) (TensorFlow, onnxruntime, TVM," \
	  "MLflow and the test tools: about 2 GB, a few minutes on a fast connection; nothing is shown meanwhile)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,test]" -e examples/runtime_plugin
	@echo "make: $(VENV) is ready"
	touch $@

# System packages the tests need, installed only when missing (as root, sudo otherwise; quietly): Debian's
# aarch64 cross compiler (tests/test_tvm_cross.py), systemd-analyze (checks the unit in SECURITY.md) and
# Debian's python3 with its venv module (tests/test_old_python.py).
CROSS_CC := aarch64-linux-gnu-gcc
APT_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
system-deps:
	@missing=""; why=""; \
	echo 'int f(void) { return 0; }' | $(CROSS_CC) -shared -x c - -o /dev/null 2>/dev/null \
	  || { missing="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"; \
	       why="the aarch64 cross compiler (tests/test_tvm_cross.py builds a TVM model for a Jetson)"; }; \
	command -v systemd-analyze >/dev/null \
	  || { missing="$$missing systemd"; why="$$why; systemd-analyze (checks the unit in SECURITY.md)"; }; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null \
	  || { missing="$$missing nginx"; why="$$why; nginx (tests/test_pull_cache.py runs examples/pull-cache/nginx.conf)"; }; \
	$(OLD_PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
	  || { missing="$$missing python3 python3-venv"; why="$$why; Debian's python3 (tests/test_old_python.py)"; }; \
	[ -z "$$missing" ] || { \
	  command -v apt-get >/dev/null || { echo "install these (Debian's names): $$missing" >&2; exit 1; }; \
	  echo "make system-deps: installing $$missing with apt-get, once: $${why#; }"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO $(APT_INSTALL) $$missing >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -qq && $$SUDO $(APT_INSTALL) $$missing >/dev/null; }; }

# Only the device side, with onnxruntime<1.24: the last releases that follow ONNX external data outside the
# model directory, so tests/test_old_python.py also shows the server refusing such models by itself.
$(OLD_VENV)/.installed: pyproject.toml | system-deps
	$(OLD_PYTHON) -m venv --clear $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet -e ".[device-onnx]" "onnxruntime<1.24"
	touch $@

old-python: $(OLD_VENV)/.installed

# Only the device side with LiteRT (no onnxruntime, no TVM): a device that can run a model's TFLite variant alone.
$(TFLITE_VENV)/.installed: pyproject.toml
	@echo "building $(TFLITE_VENV): a device with LiteRT alone (.[device-tflite]), about a minute on first use"
	python3 -m venv --clear $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet -e ".[device-tflite]"
	touch $@

tflite-device: $(TFLITE_VENV)/.installed

quickstart: $(VENV)/.installed $(TFLITE_VENV)/.installed
	ARACHNE_TFLITE_VENV=$(abspath $(TFLITE_VENV)) $(PY) examples/quickstart.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: system-deps lint $(OLD_VENV)/.installed $(TFLITE_VENV)/.installed
	ARACHNE_OLD_PYTHON_VENV=$(abspath $(OLD_VENV)) ARACHNE_TFLITE_VENV=$(abspath $(TFLITE_VENV)) $(PY) -m pytest

test-old-python: $(VENV)/.installed $(OLD_VENV)/.installed
	ARACHNE_OLD_PYTHON_VENV=$(OLD_VENV) $(PY) -m pytest -p no:randomly tests/test_old_python.py

test-fast: system-deps $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

benchmark: $(VENV)/.installed
	$(PY) -m benchmarks

# MLServer, KServe and `mlflow models serve` under the same load as ours (installs the first two
# into venvs of their own under benchmarks/.cache/peers on first use).
benchmark-peers: $(VENV)/.installed
	$(PY) -m benchmarks --only peers

# The committed gRPC messages (arachne_mlflow/protocol/grpc/inference_pb2.py[i]), made again from the
# .proto in a throwaway venv. grpcio-tools 1.80.0 writes gencode for protobuf 6.31.1, which every
# protobuf from 6.31.1 on loads (a newer grpcio-tools would demand protobuf >= 7 of every user).
GRPC_TOOLS_VENV ?= /tmp/arachne-grpc-tools
grpc-stubs:
	python3 -m venv $(GRPC_TOOLS_VENV)
	$(GRPC_TOOLS_VENV)/bin/python -m pip install --quiet grpcio-tools==1.80.0
	$(GRPC_TOOLS_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		arachne_mlflow/protocol/grpc/inference.proto
