"""The three flavors through MLflow's own machinery: what MLflow's flavor tests check, plus ours."""

from __future__ import annotations

import importlib
import sys

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _read_example
from mlflow.types import Schema, TensorSpec

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tflite as arachne_tflite
from arachne_mlflow.model.directory import read_model_dir


def _signature(inputs, outputs=()):
    def schema(items):
        return Schema([TensorSpec(np.dtype(dtype), shape, name) for name, dtype, shape in items]) if items else None

    return ModelSignature(schema(inputs), schema(outputs))


LINEAR_SIGNATURE = _signature([("x", "float32", (-1, 4))], [("y", "float32", (-1, 3))])


def test_save_load_round_trip(flavor_case, tmp_path):
    path = tmp_path / "model"
    flavor_case.flavor.save_model(flavor_case.model, path, **flavor_case.kwargs)
    mlmodel = Model.load(path)
    assert mlmodel.flavors["python_function"]["loader_module"] == "arachne_mlflow.pyfunc"
    block = read_model_dir(path)
    assert (block.runtime, block.version) == (flavor_case.name, "0.1.0")
    with flavor_case.flavor.load_model(str(path)) as loaded, flavor_case.direct() as direct:
        assert loaded.get_input_details() == direct.get_input_details()
        assert loaded.get_output_details() == direct.get_output_details()
        np.testing.assert_equal(loaded.infer([flavor_case.example]), direct.infer([flavor_case.example]))
        inferred = mlmodel.signature.inputs.inputs[0]
        assert (inferred.name, inferred.type.name, list(inferred.shape)) == tuple(
            direct.get_input_details()[0].values()
        )


@pytest.mark.parametrize("with_signature", [True, False])
@pytest.mark.parametrize("with_example", [True, False])
def test_signature_and_input_example_matrix(onnx_dynamic_file, tmp_path, with_signature, with_example):
    example = np.arange(8, dtype=np.float32).reshape(2, 4)
    signature = _signature([("x", "float32", (2, 4))], [("y", "float32", (-1, 3))]) if with_signature else None
    path = tmp_path / "model"
    arachne_onnx.save_model(
        str(onnx_dynamic_file), path, signature=signature, input_example=example if with_example else None
    )
    mlmodel = Model.load(path)
    assert mlmodel.signature == (signature or LINEAR_SIGNATURE)
    if with_example:
        # MLflow reads a tensor example back through the (named) signature: a dict name -> array
        np.testing.assert_equal(_read_example(mlmodel, str(path)), {"x": example})
    else:
        assert mlmodel.saved_input_example_info is None


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([("x", "float64", (-1, 4))], [], "signature input 'x': dtype float64, the model's is float32"),
        ([("z", "float32", (-1, 4))], [], "signature input 'z': the model's input at this position is 'x'"),
        ([("x", "float32", (-1, 5))], [], r"signature input 'x': shape \[-1, 5\] does not fit the model's \[-1, 4\]"),
        ([("x", "float32", (-1, 4))], [("y", "float32", (-1, 2))], "signature output 'y'"),
        ([("x", "float32", (-1, 4)), ("w", "float32", (1,))], [], "signature has 2 inputs"),
    ],
)
def test_given_signature_is_checked_against_the_model(onnx_dynamic_file, tmp_path, inputs, outputs, message):
    signature = _signature(inputs, outputs)
    with pytest.raises(InvalidInputError, match=message):
        arachne_onnx.save_model(str(onnx_dynamic_file), tmp_path / "model", signature=signature)
    assert not (tmp_path / "model").exists(), "a failed save leaves nothing behind"


def test_save_refuses_a_non_empty_path_and_takes_an_empty_one(onnx_linear_file, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="already exists and is not empty"):
        arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "taken")
    (tmp_path / "empty").mkdir()
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "empty")
    assert (tmp_path / "empty" / "MLmodel").is_file()
    with pytest.raises(ModelNotFoundError, match="not found"):
        arachne_onnx.save_model(str(tmp_path / "missing.onnx"), tmp_path / "other")


def test_default_requirements_pin_the_light_runtimes(flavor_case, tmp_path):
    import importlib.metadata as md

    expected = {"tflite": ["ai-edge-litert"], "onnx": ["onnxruntime", "onnx"], "tvm": ["apache-tvm"]}[flavor_case.name]
    pins = [f"{name}=={md.version(name)}" for name in expected] + ["arachne-mlflow==0.1.0"]
    assert flavor_case.flavor.get_default_pip_requirements() == pins
    assert not any(r.startswith("tensorflow") for r in flavor_case.flavor.get_default_pip_requirements())
    conda = flavor_case.flavor.get_default_conda_env()
    assert set(pins) <= set(conda["dependencies"][-1]["pip"])


def _requirements(path):
    return (path / "requirements.txt").read_text().splitlines()


def test_requirements_defaults_lists_files_constraints_and_extras(onnx_linear_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow reads `-c constraints.txt` relative to the working directory
    mlflow_pin = f"mlflow=={mlflow.__version__}"
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "default")
    assert _requirements(tmp_path / "default") == [mlflow_pin, *arachne_onnx.get_default_pip_requirements()]

    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "list", pip_requirements=["onnxruntime", "numpy<3"])
    assert _requirements(tmp_path / "list") == [mlflow_pin, "onnxruntime", "numpy<3"]

    req_file = tmp_path / "reqs.txt"
    req_file.write_text("onnxruntime\n-c constraints.txt\n")
    (tmp_path / "constraints.txt").write_text("onnxruntime>=1.0\n")
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "file", pip_requirements=str(req_file))
    assert _requirements(tmp_path / "file") == [mlflow_pin, "onnxruntime", "-c constraints.txt"]
    assert (tmp_path / "file" / "constraints.txt").read_text() == "onnxruntime>=1.0"

    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "extra", extra_pip_requirements=["tqdm"])
    assert _requirements(tmp_path / "extra") == [mlflow_pin, *arachne_onnx.get_default_pip_requirements(), "tqdm"]


def test_conda_env_as_dict_and_file(onnx_linear_file, tmp_path):
    conda_env = {
        "name": "env",
        "channels": ["conda-forge"],
        "dependencies": ["python=3.11", {"pip": ["onnxruntime", "six"]}],
    }
    pip = [f"mlflow=={mlflow.__version__}", "onnxruntime", "six"]  # MLflow adds its own pin
    written = {**conda_env, "dependencies": ["python=3.11", {"pip": pip}]}
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "dict", conda_env=conda_env)
    assert yaml.safe_load((tmp_path / "dict" / "conda.yaml").read_text()) == written
    assert _requirements(tmp_path / "dict") == pip
    conda_file = tmp_path / "conda.yaml"
    conda_file.write_text(yaml.safe_dump(conda_env))
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "file", conda_env=str(conda_file))
    assert yaml.safe_load((tmp_path / "file" / "conda.yaml").read_text()) == written


def test_code_paths_are_copied_and_importable_on_load(onnx_linear_file, tmp_path):
    module_name = "arachne_code_path_probe"
    source = tmp_path / "src" / f"{module_name}.py"
    source.parent.mkdir()
    source.write_text("VALUE = 42\n")
    path = tmp_path / "model"
    arachne_onnx.save_model(str(onnx_linear_file), path, code_paths=[str(source)])
    assert (path / "code" / f"{module_name}.py").is_file()
    saved_path = list(sys.path)
    try:
        mlflow.pyfunc.load_model(str(path))
        assert importlib.import_module(module_name).VALUE == 42
        sys.modules.pop(module_name)
        sys.path[:] = saved_path
        arachne_onnx.load_model(str(path)).done()
        assert importlib.import_module(module_name).VALUE == 42
    finally:
        sys.modules.pop(module_name, None)
        sys.path[:] = saved_path


def test_metadata_round_trip(onnx_linear_file, tmp_path):
    metadata = {"team": "edge", "accuracy": 0.9, "tags": ["a", "b"]}
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "model", metadata=metadata)
    assert Model.load(tmp_path / "model").metadata == metadata
    assert mlflow.pyfunc.load_model(str(tmp_path / "model")).metadata.metadata == metadata


def test_log_model_with_and_without_an_active_run(mlflow_store, onnx_linear_file):
    x = np.ones((1, 4), np.float32)
    with mlflow.start_run() as run:
        info = arachne_onnx.log_model(str(onnx_linear_file), name="model", metadata={"k": "v"})
    assert info.run_id == run.info.run_id
    assert info.metadata == {"k": "v"}
    from_run = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(x)
    outside = arachne_onnx.log_model(str(onnx_linear_file), name="outside")
    assert outside.run_id is None
    np.testing.assert_equal(mlflow.pyfunc.load_model(outside.model_uri).predict(x), from_run)
    with arachne_onnx.load_model(info.model_uri) as module:
        np.testing.assert_equal(module.infer([x])[0], from_run)


def test_log_model_registers_a_version(mlflow_store, tflite_cnn_file):
    info = arachne_tflite.log_model(tflite_cnn_file.read_bytes(), name="model", registered_model_name="flavor-test-cnn")
    assert info.registered_model_version == 1
    again = arachne_tflite.log_model(str(tflite_cnn_file), name="model", registered_model_name="flavor-test-cnn")
    assert again.registered_model_version == 2
    version = mlflow.MlflowClient().get_model_version("flavor-test-cnn", "2")
    assert version.source == again.model_uri


def test_loading_with_the_wrong_flavor_names_the_right_one(onnx_linear_file, tmp_path):
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "model")
    with pytest.raises(
        InvalidInputError, match=r"is a 'onnx' model: load it with arachne_mlflow.flavors.onnx.load_model"
    ):
        arachne_tflite.load_model(str(tmp_path / "model"))


def test_runtime_init_loads_a_saved_model_dir(flavor_case, tmp_path):
    from arachne_mlflow import runtime as arachne_runtime

    flavor_case.flavor.save_model(flavor_case.model, tmp_path / "model", **flavor_case.kwargs)
    with (
        arachne_runtime.init(flavor_case.name, model_dir=str(tmp_path / "model")) as module,
        flavor_case.direct() as direct,
    ):
        np.testing.assert_equal(module.infer([flavor_case.example]), direct.infer([flavor_case.example]))
