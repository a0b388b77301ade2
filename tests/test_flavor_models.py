"""What each flavor accepts and stores: ONNX protos and external data, TFLite bytes, TVM modules, legacy files."""

from __future__ import annotations

import tarfile

import mlflow
import numpy as np
import onnx
import pytest
import yaml
from mlflow.models import Model

from arachne_mlflow.cli import main as cli_main
from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tflite as arachne_tflite
from arachne_mlflow.flavors import tvm as arachne_tvm
from arachne_mlflow.flavors.legacy import save_legacy_model, split_dependencies
from arachne_mlflow.model.directory import read_model_dir
from tests.helpers import models

X = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)


def _expected(onnx_file):
    """What onnxruntime gives for X on the file itself."""
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init("onnx", model_file=str(onnx_file)) as module:
        return module.infer([X])[0]


# -- ONNX ---------------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True])
def test_onnx_proto_is_never_mutated(onnx_linear_file, tmp_path, external):
    proto = onnx.load(str(onnx_linear_file))
    before = proto.SerializeToString()
    arachne_onnx.save_model(proto, tmp_path / "first", save_as_external_data=external)
    arachne_onnx.save_model(proto, tmp_path / "second", save_as_external_data=external)
    assert proto.SerializeToString() == before
    assert (tmp_path / "second" / "model.onnx.data").is_file() == external
    assert ("model.onnx.data" in read_model_dir(tmp_path / "second").files()) == external  # shipped to devices
    with arachne_onnx.load_model(str(tmp_path / "second")) as module:
        np.testing.assert_equal(module.infer([X])[0], _expected(onnx_linear_file))


def test_onnx_external_data_model_is_inlined_from_a_path(onnx_linear_file, tmp_path):
    proto = onnx.load(str(onnx_linear_file))
    source = tmp_path / "src" / "big.onnx"
    source.parent.mkdir()
    onnx.save_model(proto, str(source), save_as_external_data=True, location="big.data", size_threshold=0)
    arachne_onnx.save_model(str(source), tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir() if p.name.startswith("model")) == ["model.onnx"]
    with arachne_onnx.load_model(str(tmp_path / "model")) as module:
        np.testing.assert_equal(module.infer([X])[0], _expected(onnx_linear_file))


def test_onnx_bytes_and_mlflows_own_onnx_flavor(onnx_linear_file, tmp_path):
    arachne_onnx.save_model(onnx_linear_file.read_bytes(), tmp_path / "model")
    loaded = mlflow.onnx.load_model(str(tmp_path / "model"))
    assert loaded.SerializeToString() == onnx.load(str(onnx_linear_file)).SerializeToString()


def test_onnx_runtime_options_are_stored_and_used(onnx_linear_file, tmp_path):
    options = {"providers": [("CPUExecutionProvider", {})], "sess_options": {"intra_op_num_threads": 1}}
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "model", runtime_options=options)
    stored = read_model_dir(tmp_path / "model").runtime_options
    assert stored == {"providers": [["CPUExecutionProvider", {}]], "sess_options": {"intra_op_num_threads": 1}}
    with arachne_onnx.load_model(str(tmp_path / "model")) as module:
        assert module.providers == ["CPUExecutionProvider"]
    with pytest.raises(InvalidInputError, match="unknown onnx runtime_options"):
        arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "bad", runtime_options={"threads": 2})
    with pytest.raises(InvalidInputError, match="unknown onnxruntime session option 'bogus'"):
        arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "bad", runtime_options={"sess_options": {"bogus": 1}})


# -- TFLite -------------------------------------------------------------------------------
def test_tflite_bytes_with_interpreter_options(tflite_two_inputs_file, tmp_path):
    arachne_tflite.save_model(
        tflite_two_inputs_file.read_bytes(), tmp_path / "model", runtime_options={"num_threads": 1}
    )
    assert read_model_dir(tmp_path / "model").runtime_options == {"num_threads": 1}
    mlmodel = Model.load(tmp_path / "model")
    assert len(mlmodel.signature.inputs.inputs) == 2 and len(mlmodel.signature.outputs.inputs) == 2
    with pytest.raises(InvalidInputError, match="a TFLite model is a .tflite path or bytes"):
        arachne_tflite.save_model(42, tmp_path / "bad")


# -- TVM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relax_linear():
    """The linear model as a Relax module with detached weights, and the weights."""
    return models.relax_module(models.onnx_linear(1))


def test_tvm_irmodule_compiled_here_with_spec_from_relax(relax_linear, onnx_linear_file, tmp_path):
    mod, weights = relax_linear
    arachne_tvm.save_model(mod, tmp_path / "model", params=weights, input_example=X)
    model = read_model_dir(tmp_path / "model")
    assert model.tvm["device"] == "cpu" and model.tvm["params_file"] == "params.bin"
    assert '"kind":"llvm"' in model.tvm["target"] and model.tvm["arch"]
    assert model.model_spec == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "output_0", "dtype": "float32", "shape": [1, 3]}],
    }
    prediction = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(X)
    np.testing.assert_allclose(prediction, _expected(onnx_linear_file), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"takes weights \['W', 'B'\]: pass params="):
        arachne_tvm.save_model(mod, tmp_path / "no-weights")


def test_tvm_library_needs_a_spec_and_a_given_one_is_checked(tvm_linear, tmp_path):
    with pytest.raises(InvalidInputError, match="a TVM library carries no tensor spec"):
        arachne_tvm.save_model(
            str(tvm_linear["model_file"]), tmp_path / "model", params_file=str(tvm_linear["params_file"])
        )
    spec = {
        "inputs": [*tvm_linear["model_spec"]["inputs"], {"name": "z", "dtype": "float32", "shape": [1]}],
        "outputs": tvm_linear["model_spec"]["outputs"],
    }
    with pytest.raises(InvalidInputError, match="model_spec lists 2 inputs"):
        arachne_tvm.save_model(
            str(tvm_linear["model_file"]),
            tmp_path / "model",
            params_file=str(tvm_linear["params_file"]),
            model_spec=spec,
        )


def test_tvm_executable_tar_and_cuda_device(tvm_two_io, tmp_path):
    arachne_tvm.save_model(str(tvm_two_io["model_file"]), tmp_path / "tar", model_spec=tvm_two_io["model_spec"])
    assert read_model_dir(tmp_path / "tar").model_file == "model.tar"
    a, b = np.ones((1, 4), np.float32), np.full((1, 4), 2, np.float32)
    result = mlflow.pyfunc.load_model(str(tmp_path / "tar")).predict({"a": a, "b": b})
    np.testing.assert_allclose(result["sum"], a + b)
    # a model for a device this machine lacks saves (its spec was given) but refuses to load, saying why
    arachne_tvm.save_model(
        str(tvm_two_io["model_file"]), tmp_path / "cuda", model_spec=tvm_two_io["model_spec"], tvm_device="cuda"
    )
    with pytest.raises(IncompatibleModelError, match="needs TVM device 'cuda'"):
        arachne_tvm.load_model(str(tmp_path / "cuda"))
    arachne_tvm.save_model(
        str(tvm_two_io["model_file"]),
        tmp_path / "arm",
        model_spec=tvm_two_io["model_spec"],
        arch="aarch64",
        target="llvm -mtriple=aarch64-linux-gnu",
    )
    with pytest.raises(IncompatibleModelError, match="compiled by TVM for aarch64"):
        mlflow.pyfunc.load_model(str(tmp_path / "arm"))


# -- legacy -------------------------------------------------------------------------------
ENV = {
    "model_spec": {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
    },
    "dependencies": [{"pip": [{"onnx": "1.10.0"}, {"onnxruntime": "1.9.0"}, {"pillow": "9.0.0"}]}, {"cuda": "11.1"}],
}


def test_split_dependencies_keeps_what_the_flavor_does_not_supersede():
    assert split_dependencies(ENV["dependencies"]) == (["pillow==9.0.0"], {"cuda": "11.1"})


def test_legacy_package_tar_becomes_an_mlflow_model(onnx_linear_file, tmp_path):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(ENV))
    package = tmp_path / "package.tar"
    with tarfile.open(package, "w:gz") as tar:
        tar.add(onnx_linear_file, arcname="linear.onnx")
        tar.add(tmp_path / "env.yaml", arcname="env.yaml")
    save_legacy_model(tmp_path / "model", package_tar=str(package))
    mlmodel = Model.load(tmp_path / "model")
    assert mlmodel.metadata == {"legacy_dependencies": {"cuda": "11.1"}}
    assert "pillow==9.0.0" in (tmp_path / "model" / "requirements.txt").read_text().splitlines()
    assert read_model_dir(tmp_path / "model").model_spec == ENV["model_spec"]


def test_legacy_tvm_model_file_and_env_yaml(tvm_linear, tmp_path):
    save_legacy_model(
        tmp_path / "model",
        model_file=str(tvm_linear["model_file"]),
        env_file=str(tvm_linear["env_file"]),
        params_file=str(tvm_linear["params_file"]),
    )
    model = read_model_dir(tmp_path / "model")
    assert (model.runtime, model.tvm["device"], model.model_spec) == ("tvm", "cpu", tvm_linear["model_spec"])


def test_cli_import_legacy_saves_and_logs(mlflow_store, onnx_linear_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(ENV))
    assert (
        cli_main(
            [
                "import-legacy",
                "--model-file",
                str(onnx_linear_file),
                "--env-file",
                str(tmp_path / "env.yaml"),
                "--output",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    assert read_model_dir(tmp_path / "model").runtime == "onnx"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    assert (
        cli_main(
            [
                "import-legacy",
                "--model-file",
                str(onnx_linear_file),
                "--name",
                "legacy",
                "--registered-model-name",
                "legacy-cli",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.split()
    assert lines[-1] == "models:/legacy-cli/1" and lines[-2].startswith("models:/m-")
    np.testing.assert_equal(mlflow.pyfunc.load_model("models:/legacy-cli/1").predict(X), _expected(onnx_linear_file))
    assert cli_main(["import-legacy", "--model-file", str(tmp_path / "env.yaml"), "--output", str(tmp_path / "x")]) == 1
    assert "cannot tell the runtime of env.yaml" in capsys.readouterr().err


def test_legacy_tvm_graph_executor_package_is_refused(tmp_path):
    """The old TVM package (graph executor) cannot run on TVM 0.20+: converting it must fail, not save a dud."""
    inner = tmp_path / "tvm_package.tar"
    for name in ("mod.json", "mod.params", "mod.so"):
        (tmp_path / name).write_text("{}")
    with tarfile.open(inner, "w") as tar:
        for name in ("mod.json", "mod.params", "mod.so"):
            tar.add(tmp_path / name, arcname=name)
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({**ENV, "tvm_device": "cpu"}))
    package = tmp_path / "package.tar"
    with tarfile.open(package, "w:gz") as tar:
        tar.add(inner, arcname="tvm_package.tar")
        tar.add(tmp_path / "env.yaml", arcname="env.yaml")
    with pytest.raises(IncompatibleModelError, match="graph-executor package"):
        save_legacy_model(tmp_path / "model", package_tar=str(package))
    assert not (tmp_path / "model").exists()


def test_tvm_unknown_device_name(tvm_two_io, tmp_path):
    with pytest.raises(InvalidInputError, match="unknown tvm_device 'tpu9'"):
        arachne_tvm.save_model(
            str(tvm_two_io["model_file"]), tmp_path / "model", model_spec=tvm_two_io["model_spec"], tvm_device="tpu9"
        )
