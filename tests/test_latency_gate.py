"""The latency gate of a rollout: a version made slower by construction (same outputs, a heavy branch
multiplied by 0) passes the smoke test but not a p99 budget or a regression check timed on the device,
and the rollout halts and rolls back; real device servers, a real `mlflow server`, the real plugin."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments import gate
from arachne_mlflow.deployments.strategy import Strategy, strategy_of
from arachne_mlflow.errors import HealthGateError, InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device
from tests.conftest import FLEET_TOKEN
from tests.helpers import models
from tests.helpers.fleet import deploy, fleet_file, on_server, table_rows
from tests.helpers.servers import ThreadServer

FLEET_DEVICES = 2  # (fleet_devices)
MODEL = "latency-linear"
X = np.random.default_rng(11).standard_normal((1, 4)).astype(np.float32)
BUDGET_MS = 1.0  # the slow version's p99 is milliseconds on any machine; the fast one's microseconds
BOTH_IN_LYON = {0: {"site": "lyon"}, 1: {"site": "lyon"}}


def _signature():
    return ModelSignature(
        Schema([MlflowTensorSpec(np.dtype(np.float32), (-1, 4), "x")]),
        Schema([MlflowTensorSpec(np.dtype(np.float32), (-1, 3), "y")]),
    )


@pytest.fixture(scope="module")
def registered(mlflow_server):
    """`latency-linear` v1 (fast) and v2 (the same math, slow by construction), with input examples."""
    with on_server(mlflow_server, "arachne-latency-gate-tests"):
        for model in (models.onnx_linear_scaled(1.0), models.onnx_linear_slow(1.0)):
            arachne_onnx.log_model(
                model, name="model", registered_model_name=MODEL, signature=_signature(), input_example=X
            )


def test_latency_settings_are_checked_and_recorded():
    assert not Strategy().times_latency and "gate_repeats" not in Strategy().to_dict()
    strategy = strategy_of({"gate_max_p99_ms": "5", "gate_latency_regression": "10%", "gate_repeats": "30"})
    assert (strategy.gate_max_p99_ms, strategy.gate_latency_regression, strategy.gate_repeats) == (5.0, 0.1, 30)
    recorded = strategy.to_dict()
    assert recorded["gate_latency_regression"] == "10%" and recorded["gate_max_p99_ms"] == 5.0
    assert Strategy.from_recorded(recorded) == strategy  # fleet sync rolls out with the same gate
    for bad in (
        {"gate_max_p99_ms": "0"},
        {"gate_max_p99_ms": "nan"},
        {"gate_max_p99_ms": "fast"},
        {"gate_latency_regression": "10"},  # a percentage says so
        {"gate_latency_regression": "-5%"},
        {"gate_latency_regression": "inf%"},
        {"gate_latency_regression": "10%", "gate_repeats": "0"},
        {"gate_latency_regression": "10%", "gate_repeats": "1001"},
        {"gate_repeats": "5"},  # alone it would time nothing
    ):
        with pytest.raises(InvalidInputError, match="config gate_"):
            strategy_of(bad)


@pytest.mark.slow
def test_latency_gate_on_a_device(tmp_path):
    fast, slow = (models.onnx_linear_scaled(1.0), models.onnx_linear_slow(1.0))
    dirs = {name: tmp_path / name for name in ("fast", "slow")}
    for path, model in zip(dirs.values(), (fast, slow)):
        arachne_onnx.save_model(model, path, signature=_signature())
    server = ThreadServer(tmp_path / "store", grpc=False).start().deploy(dirs)
    device, connection = Device("127.0.0.1", server.port), Connection()
    try:
        with DeviceClient("127.0.0.1", server.port) as client:
            np.testing.assert_allclose(client.infer("slow", {"x": X})["y"], client.infer("fast", {"x": X})["y"])
        budget = Strategy(gate_max_p99_ms=BUDGET_MS, gate_repeats=5)
        gate.check_latency(device, connection, "fast", "v1", budget, None)
        with pytest.raises(
            HealthGateError, match=r"'slow' v2 on 127\.0\.0\.1:\d+ is too slow: p99 [\d.]+ ms over the 1 ms"
        ):
            gate.check_latency(device, connection, "slow", "v2", budget, None)
        regression = Strategy(gate_latency_regression=0.5, gate_repeats=5)
        old = gate.baseline(device, connection, "fast", "v1", regression)
        assert old is not None and old.p99 < BUDGET_MS
        with pytest.raises(HealthGateError, match=r"p99 \+\d+% against v1's [\d.e-]+ ms, median \+\d+% against"):
            gate.check_latency(device, connection, "slow", "v2", regression, old)
        slower = gate.baseline(device, connection, "slow", "v2", regression)
        gate.check_latency(device, connection, "fast", "v3", regression, slower)  # faster: fine
    finally:
        server.stop()


@pytest.mark.slow
def test_a_slow_version_halts_the_rollout_and_is_rolled_back(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path
):
    fleet = fleet_file(tmp_path / "fleet.yaml", fleet_devices, labels=BOTH_IN_LYON)
    name = "latency"
    target = ("-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    deploy("create", *target, "-m", f"models:/{MODEL}/1", "-C", "strategy=all")

    for setting, message in (
        ("gate_latency_regression=25%", r"p99 \+\d+% against v1's [\d.e-]+ ms, median \+\d+%"),
        (f"gate_max_p99_ms={BUDGET_MS:g}", r"p99 [\d.]+ ms over the 1 ms budget"),
    ):
        _, err = deploy("update", *target, "-m", f"models:/{MODEL}/2", "-C", "canary=1", "-C", setting, expect=1)
        assert f"({MODEL} v2) halted: the health gate failed on cam-0 in batch 1 of 2" in err
        assert "is too slow:" in err
        assert re.search(message, err), err
        rows = table_rows(err)
        assert rows["cam-0"][:3] == ["v1", "v1", "rolled-back"] and rows["cam-1"][:3] == ["v1", "v1", "untouched"]
        for server in fleet_devices:
            with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
                assert device.model_record(name)["provenance"]["version"] == "1"
        desired = json.loads(MlflowClient().get_registered_model(MODEL).tags[f"arachne.deploy.{name}"])
        assert desired["status"] == "halted" and "too slow" in desired["reason"]

    # the other way round: a faster version passes a regression gate against the slow one
    deploy("update", *target, "-m", f"models:/{MODEL}/2", "-C", "strategy=all")
    _, err = deploy(
        "update", *target, "-m", f"models:/{MODEL}/1", "-C", "strategy=all", "-C", "gate_latency_regression=10%"
    )
    assert [table_rows(err)[f"cam-{i}"][:3] for i in range(2)] == [["v2", "v1", "deployed"]] * 2
    deploy("delete", *target)
