"""The pyfunc loader through `mlflow.pyfunc`: inputs, outputs, chunked batches, threads."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tflite as arachne_tflite
from arachne_mlflow.pyfunc import _load_pyfunc


@pytest.fixture(scope="module")
def saved(tmp_path_factory, onnx_linear_file, onnx_two_io_file, tflite_cnn_file, tflite_two_inputs_file):
    """Model dirs saved once for the module."""
    root = tmp_path_factory.mktemp("pyfunc")
    arachne_onnx.save_model(str(onnx_linear_file), root / "linear")
    arachne_onnx.save_model(str(onnx_two_io_file), root / "two_io")
    arachne_tflite.save_model(str(tflite_cnn_file), root / "cnn")
    arachne_tflite.save_model(str(tflite_two_inputs_file), root / "two_inputs")
    return root


def test_outputs_equal_the_runtime_exactly(flavor_case, tmp_path):
    flavor_case.flavor.save_model(flavor_case.model, tmp_path / "model", **flavor_case.kwargs)
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    with flavor_case.direct() as direct:
        expected = direct.infer([flavor_case.example])[0]
        name = direct.input_specs[0].name
    np.testing.assert_equal(model.predict(flavor_case.example), expected)
    np.testing.assert_equal(model.predict({name: flavor_case.example}), expected)
    assert isinstance(model.get_raw_model(), arachne_runtime.RuntimeModule)


def test_several_outputs_come_back_as_a_dict(saved, onnx_two_io_file, rng):
    a, b = (rng.standard_normal((1, 4)).astype(np.float32) for _ in range(2))
    result = mlflow.pyfunc.load_model(str(saved / "two_io")).predict({"a": a, "b": b})
    with arachne_runtime.init("onnx", model_file=str(onnx_two_io_file)) as direct:
        expected = direct.infer([a, b])
    assert list(result) == ["sum", "scaled"]
    np.testing.assert_equal([result["sum"], result["scaled"]], expected)


def test_dataframe_single_input_is_reshaped_to_the_tensor(saved, tflite_cnn_file, rng):
    x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    frame = pd.DataFrame(x.reshape(3, -1))
    with arachne_runtime.init("tflite", model_file=str(tflite_cnn_file)) as direct:
        expected = direct.infer([x])[0]
    np.testing.assert_equal(_load_pyfunc(str(saved / "cnn")).predict(frame), expected)


def test_dataframe_columns_feed_named_inputs(saved, tflite_two_inputs_file, rng):
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((2, 6)).astype(np.float32)
    with arachne_runtime.init("tflite", model_file=str(tflite_two_inputs_file)) as direct:
        feeds = {spec.name: a if spec.shape[1] == 4 else b for spec in direct.input_specs}  # Keras names them
        expected = dict(zip([s.name for s in direct.output_specs], direct.infer(list(feeds.values()))))
    frame = pd.DataFrame({name: list(value) for name, value in feeds.items()})  # one tensor row per cell
    for model in (_load_pyfunc(str(saved / "two_inputs")), mlflow.pyfunc.load_model(str(saved / "two_inputs"))):
        np.testing.assert_equal(model.predict(frame), expected)


def test_bad_inputs_say_what_the_model_takes(saved):
    model = _load_pyfunc(str(saved / "two_io"))
    with pytest.raises(
        InvalidInputError, match=r"an ndarray can only feed a single-input model; this one takes \['a', 'b'\]"
    ):
        model.predict(np.ones((1, 4), np.float32))
    with pytest.raises(InvalidInputError, match=r"missing input 'b'"):
        model.predict({"a": np.ones((1, 4), np.float32)})
    with pytest.raises(InvalidInputError, match="predict takes an ndarray, a dict"):
        model.predict("text")


@pytest.mark.parametrize("rows", [1, 4, 5])
def test_a_larger_batch_runs_in_chunks_of_the_fixed_batch(saved, onnx_linear_file, rows, rng):
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    with arachne_runtime.init("onnx", model_file=str(onnx_linear_file)) as direct:
        expected = np.concatenate([direct.infer([row[None]])[0] for row in x])
    np.testing.assert_equal(_load_pyfunc(str(saved / "linear")).predict(x), expected)


def test_chunking_through_mlflow_with_a_batch_free_signature(onnx_linear_file, tmp_path, rng):
    """A signature may free the fixed batch dimension (-1): MLflow then lets any batch through."""
    signature = ModelSignature(
        Schema([TensorSpec(np.dtype("float32"), (-1, 4), "x")]), Schema([TensorSpec(np.dtype("float32"), (-1, 3), "y")])
    )
    arachne_onnx.save_model(str(onnx_linear_file), tmp_path / "model", signature=signature)
    x = rng.standard_normal((7, 4)).astype(np.float32)
    with arachne_runtime.init("onnx", model_file=str(onnx_linear_file)) as direct:
        expected = np.concatenate([direct.infer([row[None]])[0] for row in x])
    np.testing.assert_equal(mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(x), expected)


@pytest.mark.parametrize("name", ["cnn", "linear"])  # a locked backend (LiteRT) and a parallel one (onnxruntime)
def test_concurrent_calls_equal_sequential_ones(saved, name):
    model = mlflow.pyfunc.load_model(str(saved / name))
    shape = (2, 8, 8, 3) if name == "cnn" else (1, 4)
    inputs = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(50)]
    sequential = [model.predict(x) for x in inputs]

    def worker(offset):
        return [model.predict(inputs[(offset + i) % 50]) for i in range(50)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for offset, outputs in enumerate(results):
        for i, output in enumerate(outputs):
            np.testing.assert_equal(output, sequential[(offset + i) % 50])


def test_model_config_overrides_stored_runtime_options(onnx_linear_file, tmp_path):
    x = np.ones((1, 4), np.float32)
    arachne_onnx.save_model(
        str(onnx_linear_file), tmp_path / "m", runtime_options={"sess_options": {"intra_op_num_threads": 2}}
    )
    stored = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    model = mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config={"sess_options": {"intra_op_num_threads": 1}})
    threads = [m.get_raw_model()._session.get_session_options().intra_op_num_threads for m in (stored, model)]
    assert threads == [2, 1]
    np.testing.assert_array_equal(model.predict(x), stored.predict(x))


def test_importing_the_loader_stays_light():
    code = (
        "import sys, arachne_mlflow.pyfunc; "
        "print(sorted({'mlflow', 'pandas', 'onnxruntime', 'tvm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
