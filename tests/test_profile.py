"""`arachne-mlflow profile` (arachne_mlflow/profiling/) and the device predictor (deployments/predictor.py)
against real device servers of two kinds and a real `mlflow server`.

The two kinds: a device server in the shared venv (onnxruntime, TVM, LiteRT) and one in the
old-Python venv that `make old-python` builds (Debian's Python with `.[device-onnx]` only and an
older onnxruntime), so the TVM variant cannot run there and is skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from mlflow import MlflowClient

from arachne_mlflow.cli import main
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments.predictor import device_predictor
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import variants, variants_build
from arachne_mlflow.model.device_kind import device_kind
from arachne_mlflow.profiling import Plan, profile_model
from arachne_mlflow.profiling.runs import SUMMARY_TAG, experiment_name
from tests.helpers import models
from tests.helpers.fleet import on_server
from tests.helpers.servers import ServerProcess, device_venv_python

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "profiled"
EXAMPLE = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
SERVED = "served"


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """Two kinds of device, each serving `served` already."""
    full = ServerProcess(tmp_path_factory.mktemp("full") / "store").start()
    onnx_only = ServerProcess(
        tmp_path_factory.mktemp("onnx-only") / "store",
        python=device_venv_python("ARACHNE_OLD_PYTHON_VENV", ".venv-old-python", "old-python"),
    ).start(120)
    served = tmp_path_factory.mktemp("served") / "model"
    arachne_onnx.save_model(models.onnx_linear("N"), served, input_example=EXAMPLE)
    for server in (full, onnx_only):
        with DeviceClient("127.0.0.1", server.port) as client:
            client.upload_model(SERVED, served)
    yield full, onnx_only
    full.stop()
    onnx_only.stop()


@pytest.fixture(scope="module")
def three_variants(mlflow_server, tmp_path_factory):
    """`profiled` version 1: onnx (reference), onnx-int8, TVM for this machine, registered on the server."""
    work = tmp_path_factory.mktemp("profile-src")
    onnx.save(models.onnx_linear("N"), str(work / "model.onnx"))
    builds = variants_build.build_variants(work / "model.onnx", work / "builds", ["onnx", "onnx-int8", "tvm-host"])
    with on_server(mlflow_server):
        variants.log_model(
            {name: b.variant for name, b in builds.items()},
            name="model",
            input_example=EXAMPLE,
            registered_model_name=MODEL,
        )
    return list(builds)


def _target(*servers):
    return "arachne-jetson://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def _state(server):
    with DeviceClient("127.0.0.1", server.port) as client:
        return client.model_record(SERVED), client.infer(SERVED, {"x": EXAMPLE})["y"], client.repository_index()


def test_profile_logs_a_run_per_variant_and_kind_and_leaves_devices_as_they_were(
    devices, three_variants, tracking_server
):
    before = [_state(s) for s in devices]
    messages = []
    since = int(time.time() * 1000)  # (other tests profile the same model: their runs are older)
    result = profile_model(
        f"models:/{MODEL}/1", _target(*devices), plan=Plan(repeats=30, warmup=3), progress=messages.append
    )
    kinds = {}
    for server in devices:
        with DeviceClient("127.0.0.1", server.port) as client:
            kinds[server.port] = device_kind(client.server_metadata())
    assert kinds[devices[0].port].key != kinds[devices[1].port].key
    measured = {(row.device, row.variant) for row in result.rows if row.measurement and row.measurement.ok}
    full, onnx_only = (f"127.0.0.1:{s.port}" for s in devices)
    assert measured == {(full, v) for v in three_variants} | {(onnx_only, "onnx"), (onnx_only, "onnx-int8")}
    assert [(r.device, r.variant) for r in result.rows if r.skipped] == [(onnx_only, three_variants[2])]
    assert any(m.startswith(f"{onnx_only} (") and f"{three_variants[2]}: skipped" in m for m in messages)

    experiment = MlflowClient().get_experiment_by_name(experiment_name(MODEL))
    runs = MlflowClient().search_runs([experiment.experiment_id], f"attributes.start_time >= {since}")
    assert len(runs) == 5 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        kind = kinds[int(params["device"].rsplit(":", 1)[1])]
        assert params["device_kind"] == tags["arachne.profile.device_kind"] == kind.key
        assert params["repeats"] == "30" and params["warmup"] == "3" and 1 <= int(params["repeats_done"]) <= 30
        assert params["runtime"] in ("onnx", "tvm") and params["runtime_version"] and params["arch"]
        assert tags["arachne.profile.registered_model"] == MODEL and tags["arachne.profile.model_version"] == "1"
        for name in ("load_ms", "first_inference_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "model_mb"):
            assert metrics[name] > 0, (name, params["variant"])
        assert metrics["p50_ms"] <= metrics["p90_ms"] <= metrics["p99_ms"]
        assert "memory_growth_mb" in metrics and metrics["within_tolerance"] == 1.0
    onnx_runtime = {
        r.data.params["device"]: r.data.params["runtime_version"] for r in runs if r.data.params["runtime"] == "onnx"
    }
    assert onnx_runtime[full] != onnx_runtime[onnx_only]  # the old venv's onnxruntime is older

    summary = json.loads(MlflowClient().get_model_version(MODEL, "1").tags[SUMMARY_TAG])
    assert set(summary) == {k.key for k in kinds.values()}
    for _key, best in summary.items():
        assert best["variant"] in three_variants and best["p50_ms"] > 0
    assert summary[kinds[devices[1].port].key]["variant"] != three_variants[2]
    assert [_state(s)[0] for s in devices] == [b[0] for b in before]
    for (_record, answer, index), server in zip(before, devices):
        after = _state(server)
        np.testing.assert_array_equal(after[1], answer)
        assert after[2] == index  # no scratch model left behind


def test_one_device_failing_does_not_stop_the_others(devices, three_variants, tracking_server, capsys):
    dead = "127.0.0.1:9"  # nothing listens on the discard port
    code = main(
        [
            "profile",
            f"models:/{MODEL}/1",
            "-t",
            f"arachne-jetson://{dead},127.0.0.1:{devices[1].port}",
            "--repeats",
            "5",
            "--warmup",
            "1",
            "--no-log",
            "-C",
            "connect_timeout=1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{dead}: unreachable" in err
    lines = [line for line in out.splitlines() if f"127.0.0.1:{devices[1].port}" in line]
    assert len(lines) == 3 and sum("skipped" in line for line in lines) == 1
    assert "5 repeats after 1 warm-up runs" in out


def test_device_predictor_gives_evaluate_the_metrics_of_a_local_evaluation(devices, tracking_server, tmp_path):
    model_dir = tmp_path / "classifier"
    arachne_onnx.save_model(models.onnx_linear("N"), model_dir, input_example=EXAMPLE)
    rows = np.random.default_rng(8).standard_normal((200, 4)).astype(np.float32)
    local = mlflow.pyfunc.load_model(str(model_dir)).predict(rows)
    labels = np.argmax(local, axis=1)
    labels[::7] = (labels[::7] + 1) % 3  # some wrong answers, so accuracy is not 1
    frame = pd.DataFrame(rows, columns=[f"f{i}" for i in range(4)]).assign(label=labels)
    with DeviceClient("127.0.0.1", devices[1].port) as client:
        client.upload_model("classifier", model_dir)
    try:
        predict = device_predictor(
            f"arachne-jetson://127.0.0.1:{devices[1].port}", "classifier", classes=True, batch_rows=16
        )
        with mlflow.start_run():
            on_device = mlflow.models.evaluate(model=predict, data=frame, targets="label", model_type="classifier")
        with mlflow.start_run():
            here = mlflow.models.evaluate(
                model=lambda f: np.argmax(mlflow.pyfunc.load_model(str(model_dir)).predict(f.to_numpy(np.float32)), 1),
                data=frame,
                targets="label",
                model_type="classifier",
            )
    finally:
        with DeviceClient("127.0.0.1", devices[1].port) as client:
            client.delete_model("classifier")
    assert 0.5 < on_device.metrics["accuracy_score"] < 1
    for name in ("accuracy_score", "f1_score", "precision_score", "recall_score"):
        assert on_device.metrics[name] == pytest.approx(here.metrics[name])


def test_profile_with_data_evaluates_each_variant_on_the_device(devices, three_variants, tracking_server, tmp_path):
    rows = np.random.default_rng(9).standard_normal((300, 4)).astype(np.float32)
    reference = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(rows)
    frame = pd.DataFrame(rows, columns=[f"f{i}" for i in range(4)]).assign(label=np.argmax(reference, axis=1))
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False)
    code = main(
        [
            "profile",
            f"models:/{MODEL}/1",
            "-t",
            _target(devices[1]),
            "--data",
            str(data),
            "--targets",
            "label",
            "--sample-rows",
            "100",
            "--repeats",
            "5",
        ]
    )
    assert code == 0
    experiment = MlflowClient().get_experiment_by_name(experiment_name(MODEL))
    runs = MlflowClient().search_runs([experiment.experiment_id], "params.inputs = 'data (100 of 300 rows)'")
    assert sorted(r.data.params["variant"] for r in runs) == ["onnx", "onnx-int8"]
    by_variant = {r.data.params["variant"]: r.data.metrics for r in runs}
    assert by_variant["onnx"]["accuracy_score"] == 1.0  # the device's answers are the host's labels
    assert by_variant["onnx-int8"]["accuracy_score"] >= 0.9  # within the int8 build's top-1 tolerance


def test_the_summary_tag_puts_the_fastest_variant_of_a_kind_first(devices, three_variants, tracking_server):
    """A deployment sends each device the variant the profile found fastest on its kind of device (the
    model's order puts onnx first: the tag names another), and the model's order where nothing was measured."""
    from mlflow.deployments import get_deploy_client

    full, onnx_only = devices
    with DeviceClient("127.0.0.1", full.port) as client:
        kind = device_kind(client.server_metadata()).key
    summary = {kind: {"variant": "onnx-int8", "p50_ms": 0.01, "label": "x86_64", "at": "2026-12-07T00:00:00+00:00"}}
    MlflowClient().set_model_version_tag(MODEL, "1", SUMMARY_TAG, json.dumps(summary))
    deployments = get_deploy_client(_target(full, onnx_only))
    try:
        result = deployments.create_deployment("fastest", f"models:/{MODEL}/1", config={"report": "false"})
        chosen = {device["device"]: device.get("variant") for device in result["devices"]}
        assert chosen == {f"127.0.0.1:{full.port}": "onnx-int8", f"127.0.0.1:{onnx_only.port}": "onnx"}
    finally:
        MlflowClient().delete_model_version_tag(MODEL, "1", SUMMARY_TAG)
        deployments.delete_deployment("fastest", config={"report": "false"})  # the devices and the registry
