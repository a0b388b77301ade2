"""The MLmodel `arachne` block reader, on hand-written MLmodel files (it must not need MLflow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.directory import read_model_dir


def _write_mlmodel(directory, arachne, signature=None, flavors_extra=None):
    mlmodel = {"flavors": {"arachne": arachne, **(flavors_extra or {})}}
    if signature is not None:
        mlmodel["signature"] = {k: json.dumps(v) for k, v in signature.items()}
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _tensor(name, shape, dtype="float32"):
    return {"name": name, "type": "tensor", "tensor-spec": {"dtype": dtype, "shape": shape}}


def test_reads_tvm_model_and_loads_it(tmp_path, tvm_linear, rng):
    shutil.copy(tvm_linear["model_file"], tmp_path / "model.so")
    shutil.copy(tvm_linear["params_file"], tmp_path / "params.bin")
    (tmp_path / "requirements.txt").write_text("apache-tvm\n")
    (tmp_path / "unrelated.txt").write_text("not part of the model")
    _write_mlmodel(
        tmp_path,
        {"runtime": "tvm", "model_file": "model.so", "tvm": {"device": "cpu", "params_file": "params.bin"}},
        {"inputs": [_tensor("x", [1, 4])], "outputs": [_tensor("y", [1, 3])]},
    )
    model = read_model_dir(tmp_path)
    assert model.model_spec == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
    }
    assert model.files() == ["MLmodel", "model.so", "params.bin", "requirements.txt"]
    x = rng.standard_normal((1, 4)).astype(np.float32)
    with arachne_runtime.load(model) as m, arachne_runtime.init("tvm", model_dir=str(tmp_path)) as same:
        np.testing.assert_equal(m.infer([x])[0], same.infer([x])[0])


def test_tvm_for_another_arch_is_refused(tmp_path, tvm_linear):
    shutil.copy(tvm_linear["model_file"], tmp_path / "model.so")
    _write_mlmodel(tmp_path, {"runtime": "tvm", "model_file": "model.so", "tvm": {"arch": "riscv64", "target": "llvm"}})
    with pytest.raises(IncompatibleModelError, match="compiled by TVM for riscv64"):
        arachne_runtime.load(read_model_dir(tmp_path))


def test_errors_name_the_problem(tmp_path, onnx_linear_file):
    with pytest.raises(ModelNotFoundError, match="no MLmodel"):
        read_model_dir(tmp_path)
    _write_mlmodel(tmp_path, {"runtime": "onnx", "model_file": "../escape.onnx"})
    with pytest.raises(InvalidInputError, match="leaves the model directory"):
        read_model_dir(tmp_path)
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {}, "sklearn": {}}}))
    with pytest.raises(
        InvalidInputError, match=r"no 'arachne' flavor \(its flavors: \['python_function', 'sklearn'\]\)"
    ):
        read_model_dir(tmp_path)
    _write_mlmodel(tmp_path, {"runtime": "onnx", "model_file": "model.onnx"})
    with pytest.raises(ModelNotFoundError, match="'model.onnx' named in"):
        read_model_dir(tmp_path)
    shutil.copy(onnx_linear_file, tmp_path / "model.onnx")
    with pytest.raises(InvalidInputError, match="holds a 'onnx' model, not 'tflite'"):
        arachne_runtime.init("tflite", model_dir=str(tmp_path))


@pytest.mark.parametrize(
    "mlmodel, match",
    [
        (b"\xff\xfe\x00 not text", "not valid YAML"),
        (b"flavors:\n  arachne: [1, 2]\n", "must be a mapping"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx, runtime_options: fast}\n", "runtime_options"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx, tvm: 5}\n", "'arachne.tvm'"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx, extra_files: 5}\n", "extra_files"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx, extra_files: [5]}\n", "not a string"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx}\nsignature: {inputs: '{not json'}\n", "signature"),
        (b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx}\nsignature: {inputs: '[1]'}\n", "signature"),
        (
            b"flavors:\n  arachne: {runtime: onnx, model_file: m.onnx}\n"
            b'signature: {inputs: \'[{"type": "tensor"}]\'}\n',
            "signature",
        ),
    ],
)
def test_malformed_mlmodel_is_invalid_input(tmp_path, mlmodel, match):
    """A hostile upload's MLmodel must give a clear InvalidInputError (HTTP 400), never a crash (500)."""
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "MLmodel").write_bytes(mlmodel)
    with pytest.raises(InvalidInputError, match=match):
        read_model_dir(tmp_path)
