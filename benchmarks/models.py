"""Models for the benchmarks, built here with random weights (no downloads) and cached on disk.

MobileNetV2 comes from Keras, is converted to TFLite, then to ONNX from that same TFLite file
(tf2onnx) and compiled by TVM from the ONNX model, so all three run the same network. The tiny
MatMul+Add+Relu model exposes per-call overhead; the MLP (three 1024x1024 layers, 12 MiB of
weights, a dynamic batch dimension) is where batching pays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("ARACHNE_BENCH_CACHE", Path(__file__).parent / ".cache"))


def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """The tiny model (`seed` picks its random weights)."""
    from onnx import TensorProto, helper, numpy_helper

    if not path.exists():
        rng = np.random.default_rng(seed)
        w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")
        b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
        graph = helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "W"], ["xw"]),
                helper.make_node("Add", ["xw", "B"], ["xwb"]),
                helper.make_node("Relu", ["xwb"], ["y"]),
            ],
            "tiny",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
            [w, b],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        _write(path, model.SerializeToString())
    return path


def mlp_onnx(path: Path, width: int = 1024, layers: int = 3) -> Path:
    """x[batch, width] -> y[batch, width]: MatMul+Add per layer, Relu between."""
    from onnx import TensorProto, helper, numpy_helper

    if not path.exists():
        rng = np.random.default_rng(0)
        nodes, weights, previous = [], [], "x"
        for i in range(layers):
            w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
            weights += [
                numpy_helper.from_array(w, f"W{i}"),
                numpy_helper.from_array(np.zeros(width, np.float32), f"B{i}"),
            ]
            out = "y" if i == layers - 1 else f"a{i}"
            nodes += [
                helper.make_node("MatMul", [previous, f"W{i}"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", f"B{i}"], [out]),
            ]
            if out != "y":
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
                previous = f"r{i}"
        graph = helper.make_graph(
            nodes,
            "mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
            weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        _write(path, model.SerializeToString())
    return path


def tiny_tflite(path: Path) -> Path:
    if not path.exists():
        tf = _tf()
        inputs = tf.keras.Input(shape=(16,), batch_size=1, name="x")
        outputs = tf.keras.layers.Dense(16, activation="relu")(inputs)
        _write(path, tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, outputs)).convert())
    return path


def mobilenet_tflite(path: Path, size: int = 224, alpha: float = 1.0) -> Path:
    if not path.exists():
        tf = _tf()
        model = tf.keras.applications.MobileNetV2(
            weights=None, classifier_activation=None, input_shape=(size, size, 3), alpha=alpha
        )
        inputs = tf.keras.Input(shape=(size, size, 3), batch_size=1, name="image")
        _write(path, tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, model(inputs))).convert())
    return path


def onnx_from_tflite(tflite_path: Path, path: Path) -> Path:
    if not path.exists():
        import tf2onnx

        model, _ = tf2onnx.convert.from_tflite(str(tflite_path), opset=17)
        _write(path, model.SerializeToString())
    return path


def tvm_from_onnx(onnx_path: Path, directory: Path) -> dict:
    """Compile for `llvm` with weights bound in; returns runtime.init kwargs."""
    library = directory / "model.so"
    if not library.exists():
        import onnx
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        directory.mkdir(parents=True, exist_ok=True)
        executable = tvm.compile(from_onnx(onnx.load(str(onnx_path))), target="llvm")
        tmp = directory / "model.tmp.so"
        executable.export_library(str(tmp))
        os.replace(tmp, library)
    from arachne_mlflow import runtime

    with runtime.init("onnx", model_file=str(onnx_path)) as m:
        spec = {"inputs": m.get_input_details(), "outputs": m.get_output_details()}
    return {"model_file": str(library), "model_spec": spec}


def build_all(quick: bool) -> dict[str, dict]:
    """Every benchmark model as runtime.init kwargs, keyed by "<model>/<runtime>"."""
    CACHE.mkdir(parents=True, exist_ok=True)
    size, alpha, tag = (96, 0.35, "mobilenet_v2_96") if quick else (224, 1.0, "mobilenet_v2")
    tflite = mobilenet_tflite(CACHE / f"{tag}.tflite", size, alpha)
    onnx_file = onnx_from_tflite(tflite, CACHE / f"{tag}.onnx")
    tiny = tiny_onnx(CACHE / "tiny.onnx")
    return {
        "tiny/onnx": {"runtime": "onnx", "model_file": str(tiny)},
        "mlp/onnx": {"runtime": "onnx", "model_file": str(mlp_onnx(CACHE / "mlp.onnx"))},
        "tiny/tflite": {"runtime": "tflite", "model_file": str(tiny_tflite(CACHE / "tiny.tflite"))},
        "tiny/tvm": {"runtime": "tvm", **tvm_from_onnx(tiny, CACHE / "tiny_tvm")},
        "mobilenet/onnx": {"runtime": "onnx", "model_file": str(onnx_file)},
        "mobilenet/tflite": {"runtime": "tflite", "model_file": str(tflite)},
        "mobilenet/tvm": {"runtime": "tvm", **tvm_from_onnx(onnx_file, CACHE / f"{tag}_tvm")},
    }


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    return tf


def _write(path: Path, data: bytes) -> None:
    """Write atomically so an interrupted build never leaves a half model in the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
