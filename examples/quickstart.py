"""Quickstart: build a small ONNX model, log it to MLflow with the arachne flavor, register it,
give it the alias `champion`, load `models:/<name>@champion` through mlflow.pyfunc and predict.

It uses MLflow's embedded store in the working directory (sqlite:///mlflow.db, artifacts in
./mlruns) unless MLFLOW_TRACKING_URI says otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import time

import mlflow
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.flavors import onnx as arachne_onnx

MODEL_NAME = "arachne-quickstart"


def build_onnx():
    """x[batch, 4] -> relu(x @ W)[batch, 3], random weights."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])],
        "quickstart",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weights],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main() -> None:
    start = time.perf_counter()
    model = build_onnx()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    mlflow.set_experiment("arachne-quickstart")
    with mlflow.start_run() as run:
        info = arachne_onnx.log_model(model, name="model", registered_model_name=MODEL_NAME, input_example=x)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)

    uri = f"models:/{MODEL_NAME}@champion"
    loaded = mlflow.pyfunc.load_model(uri)
    prediction = loaded.predict(x)
    with arachne_runtime.init("onnx", model_content=model.SerializeToString()) as direct:
        same = np.array_equal(prediction, direct.infer([x])[0])

    print(f"tracking URI:      {mlflow.get_tracking_uri()}")
    print(f"run:               {run.info.run_id}")
    print(f"logged model:      {info.model_uri}")
    print(f"registered:        {MODEL_NAME} version {info.registered_model_version}, alias champion")
    print(f"signature inputs:  {loaded.metadata.get_input_schema()}")
    print(f"signature outputs: {loaded.metadata.get_output_schema()}")
    print(f"prediction via {uri}:")
    print(np.round(prediction, 3))
    print(f"equal to the unified runtime's output: {same}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not same:
        raise SystemExit("pyfunc and runtime outputs differ")


if __name__ == "__main__":
    main()
