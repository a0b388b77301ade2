"""A heterogeneous fleet and one model version with variants (docs/flavors.md, docs/deployments.md).

Real device servers in separate environments: the main venv (TVM, onnxruntime, LiteRT), the
old-Python venv with `.[device-onnx]` alone (`make old-python`) and a venv with `.[device-tflite]`
alone (`make tflite-device`); a real `mlflow server`. One registered version holds a TVM variant for
this machine, a TVM variant cross-compiled for aarch64 (which no device here may receive), a TFLite
and an ONNX variant, in that order: each device gets the first it can run, and only its files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.flavors import variants, variants_build
from arachne_mlflow.flavors.variants import Variant
from arachne_mlflow.model.arch import machine_arch
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.directory import read_model_dir
from tests.helpers import models
from tests.helpers.fleet import deploy, fleet_command, fleet_file, on_server, table_rows
from tests.helpers.servers import ServerProcess, device_venv_python

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL, NAME = "fleet-variants", "detector"
EXAMPLE = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
# LiteRT names its tensors after the converted function: the other builds take the same names
IN, OUT = "serving_default_x:0", "PartitionedCall:0"
HOST_TVM = f"tvm-{machine_arch()}"
EXPECTED = {"cam-0": HOST_TVM, "cam-1": "onnx", "cam-2": "tflite"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """cam-0: the main venv (TVM and all); cam-1: onnxruntime alone; cam-2: LiteRT alone."""
    old = device_venv_python("ARACHNE_OLD_PYTHON_VENV", ".venv-old-python", "old-python")
    tflite = device_venv_python("ARACHNE_TFLITE_VENV", ".venv-tflite", "tflite-device")
    servers = [
        ServerProcess(tmp_path_factory.mktemp("tvm-device") / "store"),
        ServerProcess(tmp_path_factory.mktemp("onnx-device") / "store", python=old),
        ServerProcess(tmp_path_factory.mktemp("tflite-device") / "store", python=tflite),
    ]
    for server in servers:
        server.start(120)
    path = fleet_file(tmp_path_factory.mktemp("fleet") / "fleet.yaml", servers)
    yield servers, path
    for server in servers:
        server.stop()


def _linear_onnx():
    model = models.onnx_linear("N")
    model.graph.input[0].name, model.graph.output[0].name = IN, OUT
    model.graph.node[0].input[0], model.graph.node[2].output[0] = IN, OUT
    return model


def _linear_tflite(model) -> bytes:
    import tensorflow as tf

    weights, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)

    class Linear(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.nn.relu(tf.matmul(x, weights) + bias)}

    linear = Linear()
    return tf.lite.TFLiteConverter.from_concrete_functions([linear.serve.get_concrete_function()], linear).convert()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    work = tmp_path_factory.mktemp("variant-builds")
    model = _linear_onnx()
    onnx.save(model, str(work / "model.onnx"))
    built = variants_build.build_variants(work / "model.onnx", work / "builds", ["tvm-host", "tvm-aarch64", "onnx"])
    return {
        HOST_TVM: built[HOST_TVM].variant,
        "tvm-aarch64": built["tvm-aarch64"].variant,
        "tflite": Variant("tflite", _linear_tflite(model)),
        "onnx": built["onnx"].variant,
    }


@pytest.fixture(scope="module")
def registered(mlflow_server, builds):
    """Versions 1 and 2 of MODEL (the same builds), alias prod on 1; the reference answers."""
    with on_server(mlflow_server):
        for _ in range(2):
            variants.log_model(builds, name="model", input_example=EXAMPLE, registered_model_name=MODEL)
    MlflowClient(mlflow_server).set_registered_model_alias(MODEL, "prod", "1")
    reference = ReferenceEvaluator(_linear_onnx()).run(None, {IN: EXAMPLE})[0]
    yield reference
    for model in (MODEL, "tvm-only"):  # and the deployments they record (a later sync of every one would meet them)
        if MlflowClient(mlflow_server).search_registered_models(f"name = '{model}'"):
            MlflowClient(mlflow_server).delete_registered_model(model)


@pytest.fixture
def fleet_env(fleet, tracking_server, monkeypatch):
    monkeypatch.setenv("ARACHNE_FLEET", str(fleet[1]))
    return fleet[0]


def _record(server, name=NAME):
    with DeviceClient("127.0.0.1", server.port) as client:
        return client.model_record(name)


def _version_dir(server, name):
    """The served version's directory in `server`'s store on disk."""
    directory = Path(server.store) / name
    return directory / json.loads((directory / "CURRENT.json").read_text())["version_dir"]


def _variant_files(model_dir: Path, variant: str) -> list[str]:
    return sorted(set(read_model_dir(model_dir, check_files=False, variant=variant).files()))


def test_each_device_gets_the_variant_it_runs_only_its_files_and_an_alias_move_per_variant(
    fleet_env, registered, tmp_path, capsys
):
    _, err = deploy("create", "-t", "arachne-jetson://@all", "--name", NAME, "-m", f"models:/{MODEL}@prod")
    rows = table_rows(err)
    assert {device: row[2] for device, row in rows.items()} == EXPECTED  # the variant column
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path)))
    for server, (device, variant) in zip(fleet_env, EXPECTED.items()):
        record = _record(server)
        files = _variant_files(local, variant)
        assert record["variant"] == variant, device
        assert record["digest"] == files_digest(local, files), device  # that variant's files, no other
        assert record["bytes"] == sum((local / f).stat().st_size for f in files), device
        stored = _version_dir(server, NAME)
        assert not any("tvm-aarch64" in str(p) for p in stored.rglob("*")), device
        with DeviceClient("127.0.0.1", server.port) as client:
            answer = client.infer(NAME, {IN: EXAMPLE})[OUT]
        np.testing.assert_allclose(answer, registered, atol=1e-5, err_msg=device)

    tags = MlflowClient().get_model_version(MODEL, "1").tags
    entries = json.loads(tags[f"arachne.devices.{NAME}"])
    assert {device: entry["variant"] for device, entry in entries.items()} == EXPECTED
    code, out, _ = fleet_command(capsys, "status", NAME)
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("cam-")}
    assert {device: line[3] for device, line in lines.items()} == EXPECTED
    assert "variant" in out.splitlines()[1]

    # an alias move rolls out per variant (in the same test: it needs the deployment above)
    MlflowClient().set_registered_model_alias(MODEL, "prod", "2")
    _, err = deploy("update", "-t", "arachne-jetson://@all", "--name", NAME, "-m", f"models:/{MODEL}@prod")
    rows = table_rows(err)
    assert {device: (row[1], row[2], row[3]) for device, row in rows.items()} == {
        device: ("v2", variant, "deployed") for device, variant in EXPECTED.items()
    }
    for server, variant in zip(fleet_env, EXPECTED.values()):
        record = _record(server)
        assert (record["provenance"]["version"], record["variant"]) == ("2", variant)
        assert record["previous"]["variant"] == variant  # a rollback gives each device its own variant back


def test_a_device_that_runs_no_variant_fails_with_what_it_lacks(fleet_env, builds, mlflow_server):
    with on_server(mlflow_server):
        info = variants.log_model(
            {HOST_TVM: builds[HOST_TVM], "tvm-aarch64": builds["tvm-aarch64"]},
            name="model",
            input_example=EXAMPLE,
            registered_model_name="tvm-only",
        )
    _, err = deploy(
        "create",
        "-t",
        "arachne-jetson://@all",
        "--name",
        "tvm-only",
        "-m",
        f"models:/tvm-only/{info.registered_model_version}",
        expect=1,
    )
    rows = table_rows(err)
    assert rows["cam-0"][3] == "deployed" and rows["cam-0"][2] == HOST_TVM
    for device in ("cam-1", "cam-2"):
        text = " ".join(rows[device])
        assert "failed" in text and "no variant of the model can run" in err
    assert "needs the 'tvm' runtime" in err and "needs CPU aarch64" in err
    assert _record(fleet_env[1], "tvm-only") is None and _record(fleet_env[2], "tvm-only") is None


def test_a_pulling_device_downloads_only_its_own_variant(mlflow_server, registered, tmp_path):
    environment = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        environment.pop(key, None)
    device = ServerProcess(
        tmp_path / "store",
        extra_args=["--follow", f"pulled=models:/{MODEL}@prod", "--follow-interval", "1", "--device-name", "puller"],
        env=environment,
    ).start(120)
    try:
        deadline = time.monotonic() + 180
        record = None
        while time.monotonic() < deadline:
            record = _record(device, "pulled")
            if record and (record.get("follow") or {}).get("state") == "following":
                break
            time.sleep(0.2)
        assert record and record["variant"] == HOST_TVM, record
        stored = _version_dir(device, "pulled")
        names = sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file())
        assert all("variants/" not in n or n.startswith(f"variants/{HOST_TVM}/") for n in names), names
        assert not (tmp_path / "store" / ".follow" / "pulled").exists() or not any(
            (tmp_path / "store" / ".follow" / "pulled").rglob("*.tflite")
        )
    finally:
        device.stop()
