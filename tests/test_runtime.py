"""The runtime API shared by every backend: registry, plugins, errors, benchmark, legacy inputs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
import yaml

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import (
    ArachneError,
    DuplicateRuntimeError,
    InvalidInputError,
    ModelNotFoundError,
    UnknownRuntimeError,
    UnsafeArchiveError,
)
from arachne_mlflow.runtime import RuntimeModule, register_runtime


def test_list_runtimes_has_builtins_and_entry_point_plugin():
    names = arachne_runtime.list_runtimes()
    assert {"tflite", "onnx", "tvm", "simple"} <= set(names)


def test_entry_point_plugin_loads_without_import(caplog):
    """`simple` is found through its installed entry point; init imports it on demand."""
    import logging

    with caplog.at_level(logging.INFO, logger="arachne_simple_runtime"):
        with arachne_runtime.init("simple", model_file=__file__) as m:
            m.run()
            assert m.get_output(0).size == 0
            assert m.get_input_details() == []
    assert "SimpleRuntimeModule.run(0 inputs)" in caplog.text
    assert type(m).runtime_name == "simple"


class Doubler(RuntimeModule):
    def __init__(self, model_file=None, factor=2.0):
        self.factor = np.float32(factor)
        spec = {"name": "x", "dtype": "float32", "shape": [-1, 2]}
        from arachne_mlflow.model.spec import TensorSpec

        self._bind_specs([TensorSpec.from_dict(spec)], [TensorSpec.from_dict({**spec, "name": "y"})])

    def _infer(self, inputs):
        return [inputs[0] * self.factor]


def test_decorator_registration_and_duplicates():
    register_runtime("test-doubler")(Doubler)
    register_runtime("test-doubler")(Doubler)  # the same class again is harmless
    with arachne_runtime.init("test-doubler", model_file=None, factor=3.0) as m:
        m.set_input("x", np.ones((2, 2), np.float32))
        m.run()
        np.testing.assert_equal(m.get_output("y"), np.full((2, 2), 3.0, np.float32))

    class Other(Doubler):
        pass

    with pytest.raises(DuplicateRuntimeError, match="'test-doubler' is already registered"):
        register_runtime("test-doubler")(Other)
    with pytest.raises(DuplicateRuntimeError, match="'onnx' is already registered"):
        register_runtime("onnx")(Other)
    with pytest.raises(TypeError, match="not a subclass"):
        register_runtime("test-not-a-module")(object)


def test_a_runtime_another_thread_imports_meanwhile_is_found(monkeypatch):
    """Two loads at once (two followed models): between its two looks, another thread moved the name
    from the lazy table to the classes; that is the runtime, not an unknown one."""
    from arachne_mlflow.runtime import registry

    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    monkeypatch.setattr(registry, "_lazy", {**registry._lazy, "test-late": f"{__name__}:Doubler"})

    def meanwhile():  # what the other thread's get_runtime_class does between this one's two looks
        registry._lazy.pop("test-late")
        registry._classes["test-late"] = Doubler

    monkeypatch.setattr(registry, "_scan_entry_points", meanwhile)
    assert registry.get_runtime_class("test-late") is Doubler


def test_unknown_runtime_lists_known():
    with pytest.raises(UnknownRuntimeError, match=r"unknown runtime 'caffe'.*'onnx'.*'tflite'"):
        arachne_runtime.init("caffe", model_file="x")


def test_missing_model_file():
    with pytest.raises(ModelNotFoundError, match="model file not found: /no/such.onnx"):
        arachne_runtime.init("onnx", model_file="/no/such.onnx")


def test_input_errors_are_actionable(onnx_two_io_file):
    m = arachne_runtime.init("onnx", model_file=str(onnx_two_io_file))
    ok = np.zeros((1, 4), np.float32)
    with pytest.raises(InvalidInputError, match=r"no input 2: valid inputs are indices 0..1 or names \['a', 'b'\]"):
        m.set_input(2, ok)
    with pytest.raises(InvalidInputError, match="no input 'c'"):
        m.set_input("c", ok)
    with pytest.raises(InvalidInputError, match="input 'a': expected dtype float32, got float64"):
        m.set_input("a", ok.astype(np.float64))
    with pytest.raises(InvalidInputError, match=r"input 'a': expected shape \[1, 4\].*got \[1, 5\]"):
        m.set_input("a", np.zeros((1, 5), np.float32))
    with pytest.raises(InvalidInputError, match="get_output\\(\\) before run"):
        m.get_output(0)
    m.set_input("a", ok)
    with pytest.raises(InvalidInputError, match=r"missing \['b'\]"):
        m.run()
    with pytest.raises(InvalidInputError, match="no output 'nope'"):
        m.get_output("nope")
    m.set_input("b", [[1, 2, 3, 4]])  # a list converts to the input's dtype
    m.run()
    np.testing.assert_equal(m.get_output("sum"), np.array([[1, 2, 3, 4]], np.float32))
    assert issubclass(InvalidInputError, ArachneError) and InvalidInputError.status_code == 400


def test_outputs_depend_on_inputs(onnx_linear_file, tflite_cnn_file, tvm_linear, rng):
    """Guard against test models whose outputs are constant (they would prove nothing)."""
    modules = [
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file)),
        arachne_runtime.init("tflite", model_file=str(tflite_cnn_file)),
        arachne_runtime.init(
            "tvm",
            model_file=str(tvm_linear["model_file"]),
            env_file=str(tvm_linear["env_file"]),
            params_file=str(tvm_linear["params_file"]),
        ),
    ]
    for m in modules:
        spec = m.input_specs[0]
        first = m.infer([np.abs(rng.standard_normal(spec.example_shape())).astype(spec.dtype)])[0]
        second = m.infer([-np.abs(rng.standard_normal(spec.example_shape())).astype(spec.dtype) * 3])[0]
        assert not np.array_equal(first, second), m
        m.done()


@pytest.mark.parametrize("runtime_name", ["onnx", "tflite", "tvm"])
def test_benchmark_reports_milliseconds(runtime_name, onnx_dynamic_file, tflite_cnn_file, tvm_linear):
    kwargs = {
        "onnx": {"model_file": str(onnx_dynamic_file)},
        "tflite": {"model_file": str(tflite_cnn_file)},
        "tvm": {
            "model_file": str(tvm_linear["model_file"]),
            "env_file": str(tvm_linear["env_file"]),
            "params_file": str(tvm_linear["params_file"]),
        },
    }[runtime_name]
    with arachne_runtime.init(runtime_name, **kwargs) as m:
        result = m.benchmark(warmup=1, repeat=5, number=2)
    assert {"mean", "std", "max", "min"} <= set(result)
    assert 0 < result["min"] <= result["mean"] <= result["max"]
    with pytest.raises(InvalidInputError):
        m.benchmark(repeat=0)


def _package(tmp_path, files: dict[str, bytes], name="pkg.tar"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for arcname, data in files.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_legacy_package_tar_extracts_privately(tmp_path, tvm_linear, rng, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"model_spec": tvm_linear["model_spec"], "tvm_device": "cpu"}
    pkg = _package(
        tmp_path,
        {
            "model.so": tvm_linear["model_file"].read_bytes(),
            "env.yaml": yaml.safe_dump(env).encode(),
        },
    )
    before = set(os.listdir(tmp_path))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    x = rng.standard_normal((1, 4)).astype(np.float32)
    m = arachne_runtime.init("tvm", package_tar=str(pkg), params_file=str(tvm_linear["params_file"]))
    out = m.infer([x])[0]
    [extracted] = scratch.iterdir()
    assert extracted.name.startswith("arachne-package-") and (extracted / "env.yaml").is_file()
    m.done()
    assert not extracted.exists()
    before.add("scratch")
    assert set(os.listdir(tmp_path)) == before  # nothing written to the working directory
    with arachne_runtime.init(
        "tvm",
        model_file=str(tvm_linear["model_file"]),
        env_file=str(tvm_linear["env_file"]),
        params_file=str(tvm_linear["params_file"]),
    ) as local:
        np.testing.assert_equal(out, local.infer([x])[0])


def test_legacy_package_tar_refuses_escaping_paths(tmp_path):
    pkg = _package(tmp_path, {"../evil.onnx": b"x", "env.yaml": b"{}"})
    with pytest.raises(UnsafeArchiveError, match="contains '..'"):
        arachne_runtime.init("onnx", package_tar=str(pkg))
    assert not (tmp_path.parent / "evil.onnx").exists()


def test_model_dir_with_env_yaml(tmp_path, onnx_linear_file):
    (tmp_path / "model.onnx").write_bytes(onnx_linear_file.read_bytes())
    (tmp_path / "env.yaml").write_text("model_spec: {}\n")
    with arachne_runtime.init("onnx", model_dir=str(tmp_path)) as m:
        assert m.get_input_details()[0]["name"] == "x"


def test_graph_executor_package_is_refused_clearly(tmp_path):
    from arachne_mlflow.errors import IncompatibleModelError

    old = _package(tmp_path, {"mod.so": b"\0", "mod.json": b"{}", "mod.params": b""}, name="mod.tar")
    with pytest.raises(IncompatibleModelError, match="graph-executor package"):
        arachne_runtime.init("tvm", model_file=str(old), model_spec={"inputs": [], "outputs": []})


def test_import_is_light():
    """`import arachne_mlflow` and the runtime load no DNN library, MLflow or web framework."""
    code = (
        "import sys, arachne_mlflow\n"
        "from arachne_mlflow import runtime\n"
        "runtime.list_runtimes()\n"
        "heavy = {'tensorflow', 'onnxruntime', 'onnx', 'tvm', 'ai_edge_litert', 'mlflow', 'starlette',"
        " 'uvicorn', 'fastapi', 'flask', 'pandas', 'requests'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seed_readme_usage_works(tflite_cnn_file, onnx_linear_file, tvm_linear, rng):
    """The earlier Arachne Runtime README's calls, verbatim apart from the import."""
    from arachne_mlflow import runtime as arachne_runtime

    input_data = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    tflite_interpreter_opts = {"num_threads": 4}
    runtime_module = arachne_runtime.init(runtime="tflite", model_file=str(tflite_cnn_file), **tflite_interpreter_opts)
    runtime_module.set_input(0, input_data)
    runtime_module.run()
    assert runtime_module.get_output(0).shape == (1, 5)

    ort_opts = {"providers": ["CPUExecutionProvider"]}
    runtime_module = arachne_runtime.init(runtime="onnx", model_file=str(onnx_linear_file), **ort_opts)
    runtime_module.set_input(0, input_data.reshape(-1)[:4].reshape(1, 4))
    runtime_module.run()
    assert runtime_module.get_output(0).shape == (1, 3)

    runtime_module = arachne_runtime.init(
        runtime="tvm",
        model_file=str(tvm_linear["model_file"]),
        env_file=str(tvm_linear["env_file"]),
        params_file=str(tvm_linear["params_file"]),
    )
    runtime_module.set_input(0, input_data.reshape(-1)[:4].reshape(1, 4))
    runtime_module.run()
    assert runtime_module.get_output(0).shape == (1, 3)


def test_a_plugin_written_the_earlier_way_loads_and_runs_unchanged(tmp_path, rng):
    """`simple-legacy` (examples/runtime_plugin) overrides the stateful methods instead of `_infer`."""
    model = tmp_path / "factor.txt"
    model.write_text("2.5")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with arachne_runtime.init("simple-legacy", model_file=str(model)) as m:
        m.set_input(0, x)
        m.run()
        np.testing.assert_array_equal(m.get_output(0), x * np.float32(2.5))
        np.testing.assert_array_equal(m.infer([x])[0], x * np.float32(2.5))  # the base drives its methods
        assert [s.to_dict() for s in m.input_specs] == m.get_input_details()
        assert not m.thread_safe and {"mean", "min"} <= set(m.benchmark(repeat=2))
        with pytest.raises(InvalidInputError, match="expected dtype float32"):
            m.infer([x.astype(np.float64)])  # the base's checks apply, from its details


def test_a_runtime_module_without_infer_or_stateful_methods_cannot_be_made():
    class Nothing(RuntimeModule):
        def __init__(self, model_file=None):
            pass

    with pytest.raises(TypeError, match="abstract method '?_infer"):
        Nothing()
