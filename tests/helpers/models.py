"""Small real models built on the spot (no downloads), once per test session.

Every model's output depends on its input (no saturated softmax), so tests that compare two
inputs or two runtimes can fail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RNG_SEED = 7


def _onnx_model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model.producer_name = "arachne-mlflow-tests"
    return model


def onnx_linear(batch: int | str = 1, scale: float = 1.0):
    """x[batch, 4] -> relu(x @ (scale * W) + b)[batch, 3]; `batch` a number, or a name for a dynamic dim.

    Another `scale` gives another version of the same model: same tensors, other outputs.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED)
    w = numpy_helper.from_array(scale * rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["xwb"]),
            helper.make_node("Relu", ["xwb"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w, b],
    )
    return _onnx_model(graph)


def onnx_linear_scaled(scale: float, batch: int | str = "N"):
    """`onnx_linear` with its weights scaled: another version of the same model (same tensors, other outputs)."""
    from onnx import numpy_helper

    model = onnx_linear(batch)
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == "W":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, "W"))
    return model


def onnx_linear_slow(scale: float = 1.0, width: int = 256, rounds: int = 12, batch: int | str = "N"):
    """`onnx_linear_scaled(scale)` made slower by construction: the same outputs, plus a chain of
    `rounds` [width, width] MatMuls fed by the input (so nothing folds at load) whose result is
    multiplied by 0 and added to y. Tanh keeps the chain finite (0 * inf would be NaN)."""
    from onnx import helper, numpy_helper

    model = onnx_linear_scaled(scale, batch)
    graph = model.graph
    graph.node[-1].output[0] = "fast_y"  # the Relu that made y
    rng = np.random.default_rng(RNG_SEED + 5)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight, "slow_W"),
            numpy_helper.from_array(np.zeros((), np.float32), "slow_zero"),
        ]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["slow_s"], keepdims=0),
        helper.make_node("Tanh", ["slow_s"], ["slow_t"]),
        helper.make_node("Mul", ["slow_W", "slow_t"], ["slow_0"]),
    ]
    for i in range(rounds):
        nodes += [
            helper.make_node("MatMul", [f"slow_{i}", "slow_W"], [f"slow_m{i}"]),
            helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_{i + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceSum", [f"slow_{rounds}"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
        helper.make_node("Add", ["fast_y", "slow_nothing"], ["y"]),
    ]
    graph.node.extend(nodes)
    return model


def onnx_reshape_fails():
    """x[N, 4] -> y[N, 3] declared, but a Reshape of x to [3, 7]: it loads, and every run fails (4N != 21)."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([3, 7], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape_fails",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [shape],
    )
    return _onnx_model(graph)


def onnx_wider_than_declared(width: int = 5):
    """x[N, 4] -> y[N, width], with y's shape left for the runtime to find (a Reshape to [N, -1]): a
    signature may claim y[-1, 3], which the model passes at logging time and breaks at run time."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, width), np.float32), "W")
    minus_one = numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
            helper.make_node("Concat", ["batch", "minus_one"], ["shape"], axis=0),
            helper.make_node("Reshape", ["xw", "shape"], ["y"]),
        ],
        "wider",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, minus_one],
    )
    return _onnx_model(graph)


def onnx_linear_external(location: str, weights: Path) -> bytes:
    """`onnx_linear(1)` with its weight W in external data at `location`; W's bytes are written to `weights`."""
    from onnx import TensorProto, external_data_helper, numpy_helper

    model = onnx_linear(1)
    tensor = next(t for t in model.graph.initializer if t.name == "W")
    weights.write_bytes(numpy_helper.to_array(tensor).tobytes())
    external_data_helper.set_external_data(tensor, location, offset=0, length=weights.stat().st_size)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return model.SerializeToString()


def onnx_two_in_two_out():
    """a[1,4], b[1,4] -> sum = a + b (float32), scaled = (a * b) @ W (float32, [1,2])."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED + 1)
    w = numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["ab"]),
            helper.make_node("MatMul", ["ab", "W"], ["scaled"]),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [1, 2]),
        ],
        [w],
    )
    return _onnx_model(graph)


def onnx_mlp(width: int = 256, layers: int = 3):
    """x[N, width] -> MLP (MatMul+Add, Relu between) -> y[N, width]: batched runs use real GEMM kernels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED + 2)
    nodes, weights, previous = [], [], "x"
    for i in range(layers):
        weights += [
            numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}"),
            numpy_helper.from_array((rng.standard_normal(width) / 10).astype(np.float32), f"B{i}"),
        ]
        nodes += [helper.make_node("MatMul", [previous, f"W{i}"], [f"m{i}"])]
        last = i == layers - 1
        nodes += [helper.make_node("Add", [f"m{i}", f"B{i}"], ["y" if last else f"a{i}"])]
        if not last:
            nodes += [helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
            previous = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        weights,
    )
    return _onnx_model(graph)


def onnx_any_shape():
    """x[N, M] (both dynamic) -> relu(x) * 2 [N, M]: requests of other widths cannot share a batch."""
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])],
        "any_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
        [two],
    )
    return _onnx_model(graph)


def onnx_lookup(rows: int = 10):
    """index[N, 1] (int64) -> table[index] [N, 1, 4]: an index outside the table fails at run time."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["y"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4])],
        [table],
    )
    return _onnx_model(graph)


def onnx_rows_not_a_batch(width: int = 4):
    """x[N, width] -> x's rows in reverse order minus their mean over dim 0 [N, width]: a dynamic first
    dimension that is not a batch (every output row depends on every input row), as in a sequence model."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).min], dtype=np.int64), "end"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "step"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "start", "end", "axis", "step"], ["reversed"]),
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["reversed", "mean"], ["y"]),
        ],
        "rows_not_a_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        consts,
    )
    return _onnx_model(graph)


def _keras_seed():
    import tensorflow as tf

    tf.keras.utils.set_random_seed(RNG_SEED)
    return tf


def tflite_cnn() -> bytes:
    """A small CNN, x[-1, 8, 8, 3] -> logits[-1, 5], random weights, no softmax."""
    tf = _keras_seed()
    inputs = tf.keras.Input(shape=(8, 8, 3), name="image")
    x = tf.keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(5, name="logits")(x)
    model = tf.keras.Model(inputs, outputs)
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def tflite_two_inputs() -> bytes:
    """a[-1, 4], b[-1, 6] -> (dense(concat) [-1, 3], a * 2 [-1, 4])."""
    tf = _keras_seed()
    a = tf.keras.Input(shape=(4,), name="a")
    b = tf.keras.Input(shape=(6,), name="b")
    joined = tf.keras.layers.Concatenate()([a, b])
    first = tf.keras.layers.Dense(3, name="first")(joined)
    second = tf.keras.layers.Rescaling(2.0, name="second")(a)
    model = tf.keras.Model([a, b], [first, second])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def relax_module(onnx_model):
    """An ONNX model as a Relax module whose weights are parameters, and those weights by name (numpy)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod, params = relax.frontend.detach_params(from_onnx(onnx_model, keep_params_in_input=True))
    func = mod["main"]
    names = [p.name for p in func.params[int(func.attrs["num_input"]) :]]
    return mod, {name: value.numpy() for name, value in zip(names, params["main"])}


def tvm_from_onnx(onnx_model, directory: Path, detach_params: bool = True, fmt: str = "so") -> dict:
    """Compile an ONNX model with the Relax frontend for `llvm`; return paths and the spec."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    directory.mkdir(parents=True, exist_ok=True)
    params_file = None
    if detach_params:
        mod, weights = relax_module(onnx_model)
        params_file = directory / "params.bin"
        tensors = {name: tvm.runtime.tensor(value) for name, value in weights.items()}
        tvm.runtime.save_param_dict_to_file(tensors, str(params_file))
    else:
        mod = from_onnx(onnx_model)
    executable = tvm.compile(mod, target="llvm")
    library = directory / f"model.{fmt}"
    executable.export_library(str(library))
    return {"model_file": library, "params_file": params_file}


def onnx_spec(onnx_model) -> dict:
    """The model_spec (old env.yaml shape) of an ONNX model, from onnxruntime's view of it."""

    with _ort(onnx_model) as m:
        return {"inputs": m.get_input_details(), "outputs": m.get_output_details()}


def _ort(onnx_model):
    from arachne_mlflow.runtime.onnx import ONNXRuntimeModule

    return ONNXRuntimeModule(model_content=onnx_model.SerializeToString())


def onnx_strings():
    """text[-1] (string) -> same (Identity): what goes in must come out, byte for byte."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
    )
    return _onnx_model(graph)


def onnx_string_constant(value: bytes):
    """x[1] (float) -> (x, a string constant holding `value`): a model whose string output is fixed."""
    from onnx import TensorProto, helper

    constant = helper.make_tensor("value", TensorProto.STRING, [1], [value])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Constant", [], ["text"], value=constant)],
        "string_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("text", TensorProto.STRING, [1]),
        ],
    )
    return _onnx_model(graph)


def onnx_bfloat16():
    """x[-1, 3] (bfloat16) -> (twice = 2x as bfloat16, wide = x as float32): CPU kernels exist for these."""
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["wide", "two"], ["doubled"]),
            helper.make_node("Cast", ["doubled"], ["twice"], to=TensorProto.BFLOAT16),
        ],
        "bfloat16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 3])],
        [
            helper.make_tensor_value_info("twice", TensorProto.BFLOAT16, ["N", 3]),
            helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", 3]),
        ],
        [two],
    )
    return _onnx_model(graph)


def tflite_strings() -> bytes:
    """text[-1] (string) -> (count [1] int32, reversed [-1] string): TFLite strings are any bytes."""
    tf = _keras_seed()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def reverse(text):
        count = tf.shape(text)
        return {"count": count, "reversed": tf.gather(text, tf.range(count[0] - 1, -1, -1))}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([reverse.get_concrete_function()], reverse)
    return converter.convert()


_CRASHES = {
    "abort": "#include <stdlib.h>\nstatic void crash(void) { abort(); }\n",
    "segfault": "static void crash(void) { *(volatile int *)0 = 0; }\n",
}


def crashing_library(path: Path, how: str = "abort") -> Path:
    """A shared library whose constructor kills the process (`abort` or `segfault`) as soon as it is
    loaded, as a broken native library or a driver mismatch can."""
    source = path.with_suffix(".c")
    source.write_text(_CRASHES[how] + "__attribute__((constructor)) static void load(void) { crash(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    return path
