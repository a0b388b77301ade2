"""Quickstart: one small ONNX model through the unified runtime (built here, nothing downloaded)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from arachne_mlflow import runtime as arachne_runtime


def build_onnx(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])],
        "quickstart",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.write_bytes(model.SerializeToString())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.onnx"
        build_onnx(model_file)
        x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
        with arachne_runtime.init(runtime="onnx", model_file=str(model_file)) as module:
            print("inputs: ", module.get_input_details())
            print("outputs:", module.get_output_details())
            module.set_input(0, x)
            module.run()
            print("output: ", module.get_output(0).round(3).tolist())
            stats = module.benchmark(warmup=10, repeat=100)
            print(f"benchmark: mean {stats['mean']:.3f} ms, min {stats['min']:.3f} ms")


if __name__ == "__main__":
    main()
