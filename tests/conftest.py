"""Session fixtures: each small model is built once and written under one temporary directory."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests import models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def onnx_linear_file(model_dir):
    path = model_dir / "linear.onnx"
    path.write_bytes(models.onnx_linear(1).SerializeToString())
    return path


@pytest.fixture(scope="session")
def onnx_dynamic_file(model_dir):
    path = model_dir / "dynamic.onnx"
    path.write_bytes(models.onnx_linear("N").SerializeToString())
    return path


@pytest.fixture(scope="session")
def onnx_two_io_file(model_dir):
    path = model_dir / "two_io.onnx"
    path.write_bytes(models.onnx_two_in_two_out().SerializeToString())
    return path


@pytest.fixture(scope="session")
def tflite_cnn_file(model_dir):
    path = model_dir / "cnn.tflite"
    path.write_bytes(models.tflite_cnn())
    return path


@pytest.fixture(scope="session")
def tflite_two_inputs_file(model_dir):
    path = model_dir / "two_inputs.tflite"
    path.write_bytes(models.tflite_two_inputs())
    return path


@pytest.fixture(scope="session")
def tvm_linear(model_dir):
    """The linear ONNX model compiled by TVM, weights detached, with its model_spec and env.yaml."""
    onnx_model = models.onnx_linear(1)
    built = models.tvm_from_onnx(onnx_model, model_dir / "tvm_linear")
    built["model_spec"] = models.onnx_spec(onnx_model)
    env_file = model_dir / "tvm_linear" / "env.yaml"
    env_file.write_text(yaml.safe_dump({"model_spec": built["model_spec"], "tvm_device": "cpu"}))
    built["env_file"] = env_file
    return built


@pytest.fixture(scope="session")
def tvm_two_io(model_dir):
    """The two-input, two-output ONNX model compiled by TVM with weights bound as constants."""
    onnx_model = models.onnx_two_in_two_out()
    built = models.tvm_from_onnx(onnx_model, model_dir / "tvm_two_io", detach_params=False, fmt="tar")
    built["model_spec"] = models.onnx_spec(onnx_model)
    return built


@pytest.fixture
def rng():
    return np.random.default_rng(0)
