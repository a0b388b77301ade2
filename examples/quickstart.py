"""Quickstart, end to end: one small model as TFLite, ONNX and TVM, from the MLflow registry to a device.

1. build x[batch, 4] -> relu(x @ W + b)[batch, 3] three ways: ONNX (onnx.helper), TFLite (Keras,
   same weights) and TVM (the ONNX model compiled with Relax for this CPU);
2. log each with its arachne flavor to MLflow's embedded store, register it, set alias `champion`;
3. load `models:/<name>@champion` through mlflow.pyfunc and predict;
4. start two device servers (`python -m arachne_mlflow.server`, loopback, a token, temporary
   stores), name them in a fleet file (cam-1 and cam-2, group `lab`), deploy every model to the
   group with the `arachne-jetson` deployments plugin (which records the desired state in the
   registry), predict through the deployment and through tritonclient on each device, and
   report whether all answers agree;
5. log one model with two variants (ONNX and TFLite builds of the same network) and deploy it to
   group `mixed`: cam-1 runs everything and gets the ONNX variant, cam-3 (a device with LiteRT
   alone, its own venv: `make quickstart` builds it) gets the TFLite one, each only its files;
6. show `arachne-mlflow fleet status`: what the registry wants against what each device runs.

The store is sqlite:///mlflow.db in the working directory (artifacts in ./mlruns) unless
MLFLOW_TRACKING_URI says otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # and its oneDNN notice
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
import numpy as np
import tritonclient.http as httpclient
import yaml
from mlflow.deployments import get_deploy_client
from onnx import TensorProto, helper, numpy_helper

from arachne_mlflow import cli
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tflite as arachne_tflite
from arachne_mlflow.flavors import tvm as arachne_tvm
from arachne_mlflow.flavors import variants

PREFIX = "arachne-quickstart"
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
TOLERANCE = 1e-5  # the three libraries order float operations differently


def build_onnx():
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["xwb"]),
            helper.make_node("Relu", ["xwb"], ["y"]),
        ],
        "quickstart",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def build_tflite() -> bytes:
    import absl.logging
    import tensorflow as tf

    absl.logging.set_verbosity(absl.logging.ERROR)
    inputs = tf.keras.Input(shape=(4,), name="x")
    dense = tf.keras.layers.Dense(3, activation="relu", name="y")
    model = tf.keras.Model(inputs, dense(inputs))
    dense.set_weights([W, B])
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints "Saved artifact at '/tmp/...'"
        return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def build_tvm(onnx_model):
    """The ONNX model as a Relax module, batch fixed at 2 (TVM compiles fixed shapes)."""
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(onnx_model, shape_dict={"x": [2, 4]})


def log_and_register(x: np.ndarray) -> dict[str, str]:
    """Log each flavor in one run, register it as `<PREFIX>-<runtime>`, alias `champion`."""
    onnx_model = build_onnx()
    builders = {
        "tflite": (arachne_tflite, build_tflite),
        "onnx": (arachne_onnx, lambda: onnx_model),
        "tvm": (arachne_tvm, lambda: build_tvm(onnx_model)),
    }
    client = mlflow.MlflowClient()
    uris = {}
    mlflow.set_experiment(PREFIX)
    with mlflow.start_run():
        for runtime, (flavor, build) in builders.items():
            name = f"{PREFIX}-{runtime}"
            info = flavor.log_model(build(), name=runtime, registered_model_name=name, input_example=x)
            client.set_registered_model_alias(name, "champion", info.registered_model_version)
            uris[runtime] = f"models:/{name}@champion"
    return uris


def log_two_variants(x: np.ndarray) -> str:
    """One registered version holding the network twice: ONNX (the reference) and TFLite. Variants
    share one signature, so the ONNX graph takes the tensor names the TFLite converter gave."""
    from ai_edge_litert.interpreter import Interpreter

    tflite = build_tflite()
    interpreter = Interpreter(model_content=tflite)
    onnx_model = build_onnx()
    graph = onnx_model.graph
    graph.input[0].name = graph.node[0].input[0] = interpreter.get_input_details()[0]["name"]
    graph.output[0].name = graph.node[-1].output[0] = interpreter.get_output_details()[0]["name"]
    name = f"{PREFIX}-variants"
    builds = {"onnx": variants.Variant("onnx", onnx_model), "tflite": variants.Variant("tflite", tflite)}
    info = variants.log_model(builds, name="model", registered_model_name=name, input_example=x)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return f"models:/{name}@champion"


def fleet_file(path: str, ports: list[int]) -> str:
    """A fleet file naming the devices cam-1, cam-2, ... : group `lab` (cam-1, cam-2, site `lab`) and
    group `mixed` (cam-1 and cam-3, the device with LiteRT alone)."""
    devices = {
        f"cam-{i}": {"address": f"127.0.0.1:{port}", "labels": {"site": "lab" if i < 3 else "edge"}}
        for i, port in enumerate(ports, 1)
    }
    groups = {"lab": {"labels": {"site": "lab"}}, "mixed": ["cam-1", "cam-3"]}
    with open(path, "w") as file:
        yaml.safe_dump({"devices": devices, "groups": groups}, file, sort_keys=False)
    return path


@contextlib.contextmanager
def device_server(token: str, python: str = sys.executable):
    """A device server (`python`'s) on a free loopback port with a temporary model store, stopped at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="arachne-quickstart-") as store:
        process = subprocess.Popen(
            [
                python,
                "-m",
                "arachne_mlflow.server",
                "--port",
                str(port),
                "--model-store",
                store,
                "--token",
                token,
                "--log-level",
                "warning",
                "--graceful-timeout",
                "1",
            ]
        )
        try:
            with DeviceClient("127.0.0.1", port, token=token) as device:
                deadline = time.monotonic() + 60
                while not _ready(device):  # a starting process gives no event to wait on: poll
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the device server did not start")
                    time.sleep(0.1)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=30)


def _ready(device: DeviceClient) -> bool:
    try:
        return device.ready()
    except ConnectionError:
        return False


def triton_infer(port: int, token: str, name: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    metadata = client.get_model_metadata(name, headers={"Authorization": f"Bearer {token}"})
    tensor = httpclient.InferInput(metadata["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(name, [tensor], headers={"Authorization": f"Bearer {token}"})
    return result.as_numpy(metadata["outputs"][0]["name"])


def tflite_device_python() -> str:
    """The Python of the venv with LiteRT alone that `make quickstart` builds (ARACHNE_TFLITE_VENV)."""
    venv = os.environ.get("ARACHNE_TFLITE_VENV") or os.path.join(os.path.dirname(__file__), os.pardir, ".venv-tflite")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        raise SystemExit(
            "run the quickstart with `make quickstart`: it builds .venv-tflite (a device with LiteRT alone) "
            "and sets ARACHNE_TFLITE_VENV to it"
        )
    return python


def main() -> None:
    start = time.perf_counter()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    expected = np.maximum(x @ W + B, 0)
    tflite_python = tflite_device_python()
    uris = log_and_register(x)
    two_variants = log_two_variants(x)
    logged = time.perf_counter() - start

    token = secrets.token_hex(16)
    os.environ["ARACHNE_TOKEN"] = token  # the plugin's token for every command
    rows = []
    servers = contextlib.ExitStack()
    with servers, tempfile.TemporaryDirectory() as tmp:
        port1, port2 = servers.enter_context(device_server(token)), servers.enter_context(device_server(token))
        port3 = servers.enter_context(device_server(token, tflite_python))
        os.environ["ARACHNE_FLEET"] = fleet_file(os.path.join(tmp, "fleet.yaml"), [port1, port2, port3])
        target = "arachne-jetson://@lab"  # the group of the fleet file: cam-1 and cam-2
        deployments = get_deploy_client(target)
        for runtime, uri in uris.items():
            name = f"quickstart-{runtime}"
            pyfunc = mlflow.pyfunc.load_model(uri).predict(x)
            # the plugin prints a table of the devices on stderr; converge: a rerun finds its last deployments
            deployed = deployments.create_deployment(name, uri, config={"converge": "true"})
            remote = np.asarray(deployments.predict(name, x)["predictions"], dtype=np.float32)
            triton = [triton_infer(port, token, name, x) for port in (port1, port2)]
            worst = max(float(np.abs(answer - expected).max()) for answer in (pyfunc, remote, *triton))
            rows.append((runtime, uri, f"version {deployed['version']}", worst))
        # one model, two variants: each device of @mixed gets the one it can run (cam-3 has no onnxruntime)
        mixed = get_deploy_client("arachne-jetson://@mixed")
        deployed = mixed.create_deployment("quickstart-variants", two_variants, config={"converge": "true"})
        chosen = {device["device"]: device.get("variant") for device in deployed["devices"]}
        triton = [triton_infer(port, token, "quickstart-variants", x) for port in (port1, port3)]
        worst = max(float(np.abs(answer - expected).max()) for answer in triton)
        rows.append(("variants", two_variants, f"version {deployed['version']}", worst))
        listed = [d["name"] for d in deployments.list_deployments()]
        print("$ arachne-mlflow fleet status", flush=True)
        cli.main(["fleet", "status"])  # the registry's desired state against what each device runs
        for runtime in uris:
            deployments.delete_deployment(f"quickstart-{runtime}", config={"report": "false"})
        mixed.delete_deployment("quickstart-variants", config={"report": "false"})

    print(f"tracking URI:  {mlflow.get_tracking_uri()}  (logged and registered in {logged:.1f} s)")
    print(f"device target: {target} (cam-1 127.0.0.1:{port1}, cam-2 127.0.0.1:{port2})  deployments: {listed}")
    print(f"variants chosen on @mixed: {chosen}")
    print(f"{'runtime':8} {'model URI':44} {'registered':12} max |pyfunc, deployment, tritonclient x2 - numpy|")
    for runtime, uri, version, worst in rows:
        print(f"{runtime:8} {uri:44} {version:12} {worst:.1e}")
    agree = all(worst <= TOLERANCE for *_, worst in rows)
    print(f"all results agree (within {TOLERANCE:g}): {agree}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not agree:
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()
