"""Safe rollouts: strategies and batches, the health gate on the device, a halted rollout rolled back,
and `arachne-mlflow fleet rollback`, against real device servers on loopback, a real `mlflow server`
and the real `mlflow deployments` CLI."""

from __future__ import annotations

import json
import logging
import re
import threading

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments import gate
from arachne_mlflow.deployments.strategy import Strategy, strategy_of
from arachne_mlflow.deployments.targets import settings
from arachne_mlflow.errors import HealthGateError, InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.spec import TensorSpec
from tests.conftest import FLEET_TOKEN
from tests.helpers import models
from tests.helpers.fleet import (
    deploy,
    fleet_command,
    fleet_file,
    on_server,
    stored_versions,
    table_rows,
    upload_times,
)
from tests.helpers.servers import ThreadServer, free_port

FLEET_DEVICES = 4  # (fleet_devices)
MODEL = "rollout-linear"
X = np.random.default_rng(5).standard_normal((1, 4)).astype(np.float32)
ROLLOUT_LOGGER = "arachne_mlflow.deployments.rollout"
ALL_IN_LYON = {i: {"site": "lyon"} for i in range(FLEET_DEVICES)}


def _signature(width=3):
    return ModelSignature(
        Schema([MlflowTensorSpec(np.dtype(np.float32), (-1, 4), "x")]),
        Schema([MlflowTensorSpec(np.dtype(np.float32), (-1, width), "y")]),
    )


@pytest.fixture(scope="module")
def registered(mlflow_server):
    """`rollout-linear` v1 and v2 (healthy, other weights), v3 (loads, every run fails) and v4 (answers
    y[1, 5] where its signature says y[-1, 3]), each with an input example; and v1's and v2's outputs for X."""
    with on_server(mlflow_server, "arachne-rollout-tests"):
        for model in (
            models.onnx_linear_scaled(1.0),
            models.onnx_linear_scaled(-2.0),
            models.onnx_reshape_fails(),
            models.onnx_wider_than_declared(),
        ):
            arachne_onnx.log_model(
                model, name="model", registered_model_name=MODEL, signature=_signature(), input_example=X
            )
    return {"out1": _expected(models.onnx_linear_scaled(1.0)), "out2": _expected(models.onnx_linear_scaled(-2.0))}


def _expected(onnx_model):
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init("onnx", model_content=onnx_model.SerializeToString()) as module:
        return module.infer([X])[0]


def _record(server, name):
    with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
        return device.model_record(name)


def _batches_seen(servers, name):
    """The batches the servers' upload times show (device indexes, in order): a batch is the devices
    whose new version arrived before any of them had switched to it; the next one arrived after."""
    times = sorted((upload_times(s, name), i) for i, s in enumerate(servers))
    batches, switched = [], None
    for (arrived, switch), index in times:
        if switched is None or arrived > switched:
            batches.append([])
            switched = switch
        batches[-1].append(index)
        switched = max(switched, switch)
    return [sorted(batch) for batch in batches]


def _batch_log(caplog):
    return [r.getMessage() for r in caplog.records if r.name == ROLLOUT_LOGGER and "batch" in r.getMessage()]


def _tags(name):
    client = MlflowClient()
    desired = json.loads(client.get_registered_model(MODEL).tags[f"arachne.deploy.{name}"])
    versions = {v.version: v.tags for v in client.search_model_versions(f"name = '{MODEL}'")}
    key = f"arachne.devices.{name}"
    return desired, {v: json.loads(t[key]) for v, t in versions.items() if key in t}


# -- strategies and the gate, without a fleet ----------------------------------------------------
def test_strategies_cut_the_fleet_into_batches():
    devices = list(range(8))
    assert strategy_of({}).batches(devices) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # rolling, 25%
    assert strategy_of({}).batches([0]) == [[0]]
    assert strategy_of({"strategy": "all"}).batches(devices) == [devices]
    assert strategy_of({"batch": "3"}).batches(devices) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert strategy_of({"strategy": "canary", "canary": "1", "batch": "50%"}).batches(devices) == [
        [0],
        [1, 2, 3, 4],
        [5, 6, 7],
    ]
    assert strategy_of({"canary": "25%"}).batches(devices)[0] == [0, 1]  # canary implies the strategy
    assert strategy_of({"batch": "1%"}).batches(devices)[0] == [0]  # at least one device
    recorded = strategy_of({"strategy": "canary", "canary": "2", "max_failures": "1", "gate_seconds": "3"})
    assert Strategy.from_recorded(recorded.to_dict()) == recorded
    for config, message in [
        ({"strategy": "blue-green"}, "strategy must be one of"),
        ({"batch": "0"}, "batch must be a count"),
        ({"batch": "150%"}, "batch must be a count"),
        ({"strategy": "all", "batch": "2"}, "batch goes with strategy=rolling or canary"),
        ({"strategy": "rolling", "canary": "1"}, "canary goes with strategy=canary"),
        ({"max_failures": "-1"}, "max_failures must be"),
        ({"gate_timeout": "0"}, "gate_timeout must be more than 0"),
        ({"gate_seconds": "1e9"}, "gate_seconds must be 0 to 3600"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            settings(config)


def test_smoke_inputs_are_the_saved_input_example(tmp_path):
    example = np.array([[1.5, -2.0, 0.25, 4.0]])  # float64: cast to the signature's float32
    arachne_onnx.save_model(models.onnx_linear("N"), tmp_path / "with", input_example=example)
    smoke = gate.smoke_of(read_model_dir(tmp_path / "with"))
    assert smoke.inputs["x"].dtype == np.float32 and np.array_equal(smoke.inputs["x"], example.astype(np.float32))
    assert [(s.name, s.shape) for s in smoke.outputs] == [("y", (-1, 3))]
    arachne_onnx.save_model(models.onnx_linear("N"), tmp_path / "without")
    random = gate.smoke_of(read_model_dir(tmp_path / "without")).inputs["x"]
    assert random.shape == (1, 4) and random.dtype == np.float32  # from the signature, dynamic dims as 1

    y = TensorSpec.create("y", "float32", [-1, 3])
    gate.check_outputs({"y": np.zeros((2, 3), np.float32)}, [y])
    with pytest.raises(HealthGateError, match=r"broke the signature: output 'y': expected shape \[-1, 3\]"):
        gate.check_outputs({"y": np.zeros((1, 5), np.float32)}, [y])
    with pytest.raises(HealthGateError, match="expected dtype float32, got float64"):
        gate.check_outputs({"y": np.zeros((1, 3))}, [y])
    with pytest.raises(HealthGateError, match=r"answered outputs \['z'\]; the signature has \['y'\]"):
        gate.check_outputs({"z": np.zeros((1, 3), np.float32)}, [y])


@pytest.mark.slow
def test_gate_on_a_device(tmp_path, onnx_linear_model):
    server = ThreadServer(tmp_path / "store", grpc=False).start().deploy({"m": onnx_linear_model})
    device, connection = Device("127.0.0.1", server.port), Connection()
    smoke = gate.smoke_of(read_model_dir(onnx_linear_model))
    try:
        gate.check(device, connection, "m", smoke, Strategy(gate_seconds=0.6))  # healthy, and no errors meanwhile

        def bad_request():  # a client's request that fails on the device while the gate watches
            with DeviceClient("127.0.0.1", server.port) as client:
                with pytest.raises(InvalidInputError):
                    client.infer("m", {"x": np.zeros((1, 4), np.float64)})

        timer = threading.Timer(0.2, bad_request)
        timer.start()
        with pytest.raises(HealthGateError, match=r"1 inference requests of 'm' failed on 127\.0\.0\.1:\d+ in the"):
            gate.check(device, connection, "m", smoke, Strategy(gate_seconds=3))
        timer.join()
        too_slow = r"took \d+\.\d s to answer the smoke inference \(gate_timeout=1e-06\)"
        with pytest.raises(HealthGateError, match=too_slow):
            gate.check(device, connection, "m", smoke, Strategy(gate_timeout=1e-6))
        wrong = gate.Smoke(smoke.inputs, [TensorSpec.create("y", "float32", [1, 5])])
        with pytest.raises(HealthGateError, match="broke the signature"):
            gate.check(device, connection, "m", wrong, Strategy())
        with DeviceClient("127.0.0.1", server.port) as client:
            client.unload_model("m")
        with pytest.raises(HealthGateError, match="model 'm' is not ready on 127.0.0.1"):
            gate.check(device, connection, "m", smoke, Strategy())
    finally:
        server.stop()


# -- rollouts on a fleet -------------------------------------------------------------------------
@pytest.mark.slow
def test_rolling_update_in_batches(fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, caplog):
    fleet = fleet_file(tmp_path / "fleet.yaml", fleet_devices, labels=ALL_IN_LYON)
    name = "rolling"
    caplog.set_level(logging.INFO, logger=ROLLOUT_LOGGER)
    target = ("-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    _, err = deploy("create", *target, "-m", f"models:/{MODEL}/1")
    assert {row[2] for row in table_rows(err).values()} == {"deployed"}
    assert _batches_seen(fleet_devices, name) == [[0], [1], [2], [3]]  # the default: 25% of 4 at a time
    assert _batch_log(caplog) == [f"rollout of '{name}': batch {i + 1} of 4 (cam-{i}): 1 deployed" for i in range(4)]

    caplog.clear()
    _, err = deploy("update", *target, "-m", f"models:/{MODEL}/2", "-C", "strategy=rolling", "-C", "batch=2")
    assert [table_rows(err)[f"cam-{i}"][:3] for i in range(4)] == [["v1", "v2", "deployed"]] * 4
    assert _batches_seen(fleet_devices, name) == [[0, 1], [2, 3]]
    assert _batch_log(caplog) == [
        f"rollout of '{name}': batch 1 of 2 (cam-0, cam-1): 2 deployed",
        f"rollout of '{name}': batch 2 of 2 (cam-2, cam-3): 2 deployed",
    ]
    desired, _ = _tags(name)
    assert desired["strategy"] == {"name": "rolling", "batch": "2", "gate_timeout": 5.0}
    assert (desired["status"], desired["version"], desired["previous_version"]) == ("rolled-out", "2", "1")
    deploy("delete", *target)


@pytest.mark.slow
def test_failing_smoke_inference_is_refused_by_the_canary_and_halts_the_rollout(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, capsys
):
    """A version whose every inference fails never replaces the served one: the canary device refuses
    its upload after a smoke inference in a child process, and no canary device taking it halts."""
    fleet = fleet_file(tmp_path / "fleet.yaml", fleet_devices, labels=ALL_IN_LYON)
    name = "canary"
    target = ("-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    deploy("create", *target, "-m", f"models:/{MODEL}/1", "-C", "strategy=all")
    before = [_record(s, name) for s in fleet_devices]
    kept = [stored_versions(s, name) for s in fleet_devices]

    _, err = deploy("update", *target, "-m", f"models:/{MODEL}/3", "-C", "canary=1", "-C", "batch=1", expect=1)
    assert f"({MODEL} v3) halted: no canary device took the model (cam-0: " in err
    rows = table_rows(err)
    assert rows["cam-0"][:3] == ["v1", "v1", "failed"] and "smoke inference" in " ".join(rows["cam-0"])
    assert [rows[f"cam-{i}"][:3] for i in (1, 2, 3)] == [["v1", "v1", "untouched"]] * 3
    for i in range(4):  # the canary kept nothing of the refused upload; the others were not asked
        assert _record(fleet_devices[i], name) == before[i] and stored_versions(fleet_devices[i], name) == kept[i]
    with DeviceClient("127.0.0.1", fleet_devices[0].port, token=FLEET_TOKEN) as device:
        np.testing.assert_allclose(device.infer(name, {"x": X})["y"], registered["out1"], rtol=1e-6)

    desired, devices = _tags(name)
    assert desired["status"] == "halted" and "no canary device took the model" in desired["reason"]
    assert (desired["version"], desired["previous_version"]) == ("3", "1")  # v3 was tried; v1 ran before
    assert devices["3"]["cam-0"]["state"] == "failed" and set(devices["3"]) == {"cam-0"}
    assert set(devices["1"]) == {f"cam-{i}" for i in range(4)}  # what they run
    code, out, _ = fleet_command(capsys, "status", name, "--fleet", fleet)
    assert code == 1 and "(halted)" in out and "status halted: v3 halted: no canary device took the model" in out
    code, _, err = fleet_command(capsys, "sync", name, "--fleet", fleet)
    assert code == 1 and "halted" in err  # left as it is: not converged
    assert _record(fleet_devices[0], name)["revision"] == before[0]["revision"]
    code, _, err = fleet_command(capsys, "rollback", name, "--fleet", fleet)  # back to what ran before v3
    assert code == 0 and {row[2] for row in table_rows(err).values()} == {"unchanged"}
    desired, _ = _tags(name)
    assert (desired["status"], desired["model_uri"], desired["previous_version"]) == (
        "rolled-out",
        f"models:/{MODEL}/1",
        None,  # v3 never ran: nothing to roll back to
    )
    deploy("delete", *target)


@pytest.mark.slow
def test_outputs_that_break_the_signature_are_refused_by_the_canaries(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path
):
    fleet = fleet_file(tmp_path / "fleet.yaml", fleet_devices, labels=ALL_IN_LYON)
    name = "signature"
    client = get_deploy_client("arachne-jetson://@lyon")
    config = {"fleet": str(fleet), "report": "false"}
    client.create_deployment(name, f"models:/{MODEL}/1", config={**config, "strategy": "all"})
    before = [_record(s, name) for s in fleet_devices]

    halted = r"halted: no canary device took the model \(cam-0: .*broke the signature: output 'y': expected shape"
    with pytest.raises(MlflowException, match=halted) as raised:
        client.update_deployment(name, f"models:/{MODEL}/4", config={**config, "canary": "2", "batch": "50%"})
    assert "failed: cam-0, cam-1; untouched: cam-2, cam-3" in str(raised.value)
    assert [_record(s, name) for s in fleet_devices] == before  # nothing switched, nothing to undo
    client.delete_deployment(name, config=config)


@pytest.mark.slow
def test_max_failures_halts_and_a_halted_create_deletes_the_model(
    fleet_devices, linear_versions, tracking_server, fleet_token_env, capsys
):
    x, versions = linear_versions
    up, down = fleet_devices[0], free_port()
    client = get_deploy_client(f"arachne-jetson://127.0.0.1:{up.port},127.0.0.1:{down}")
    strict = {"batch": "1", "max_failures": "0", "report": "false"}
    too_many = r"halted: 1 failed devices by batch 2 of 2, more than max_failures=0; rolled-back: 127"
    with pytest.raises(MlflowException, match=too_many):
        client.create_deployment("undone", str(versions[0]["dir"]), config=strict)
    assert _record(up, "undone") is None  # this rollout created it: deleted again

    get_deploy_client(f"arachne-jetson://127.0.0.1:{up.port}").create_deployment(
        "undone", str(versions[0]["dir"]), config={"report": "false"}
    )
    before = _record(up, "undone")
    with pytest.raises(MlflowException, match=too_many):
        client.update_deployment("undone", str(versions[1]["dir"]), config=strict)
    after = _record(up, "undone")
    assert (after["revision"], after["digest"]) == (before["revision"], before["digest"])
    with DeviceClient("127.0.0.1", up.port, token=FLEET_TOKEN) as device:
        np.testing.assert_allclose(device.infer("undone", x)["y"], versions[0]["y"], rtol=1e-6)
    capsys.readouterr()
    with pytest.raises(MlflowException, match=r"1 of 2 devices with"):  # without max_failures it goes on
        client.update_deployment("undone", str(versions[1]["dir"]), config={"batch": "1", "progress": "true"})
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"rollout undone: +100%.* 2/2 .*batch 2/2: 1 failed", bar), bar
    assert _record(up, "undone")["revision"] == before["revision"] + 2

    # not in the registry: `fleet rollback --target` takes the device back to the version it kept
    code, _, err = fleet_command(capsys, "rollback", "undone", "--target", f"127.0.0.1:{up.port}")
    assert code == 0 and "rolled-back" in err
    back = _record(up, "undone")
    assert (back["revision"], back["digest"]) == (before["revision"], before["digest"])
    code, _, err = fleet_command(capsys, "rollback", "unknown")
    assert code == 2 and "the registry records no deployment 'unknown': name its devices with --target" in err  # usage
    get_deploy_client(f"arachne-jetson://127.0.0.1:{up.port}").delete_deployment("undone")


@pytest.mark.slow
def test_fleet_rollback_restores_the_previous_version_while_clients_predict(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, capsys
):
    fleet = tmp_path / "fleet.yaml"
    fleet_file(fleet, fleet_devices, labels={i: {"site": "lyon"} for i in range(3)})
    name = "restore"
    target = ("-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    deploy("create", *target, "-m", f"models:/{MODEL}/1")
    v1 = [(_record(s, name)["revision"], upload_times(s, name)) for s in fleet_devices[:3]]
    fleet_file(fleet, fleet_devices, labels=ALL_IN_LYON)  # cam-3 joins: it will have no previous version

    failures, answers, stop = [], [], threading.Event()

    def keep_predicting(server):
        with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
            while not stop.is_set():
                try:
                    answers.append(device.infer(name, {"x": X})["y"])
                except Exception as err:  # noqa: BLE001  (every failure is recorded and fails the test)
                    failures.append(err)

    clients = [threading.Thread(target=keep_predicting, args=(s,)) for s in fleet_devices[:3]]
    for thread in clients:
        thread.start()
    try:
        deploy("update", *target, "-m", f"models:/{MODEL}/2")  # rolling, one device at a time
        assert [_record(s, name)["provenance"]["version"] for s in fleet_devices] == ["2"] * 4
        code, _, err = fleet_command(capsys, "rollback", name, "--fleet", fleet)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert code == 0, err
    assert not failures and len(answers) > 10
    assert all(np.allclose(a, registered["out1"]) or np.allclose(a, registered["out2"]) for a in answers)
    rows = table_rows(err)
    assert [rows[f"cam-{i}"][:3] for i in range(3)] == [["v2", "v1", "rolled-back"]] * 3  # instant, from their disks
    assert rows["cam-3"][:3] == ["v2", "v1", "deployed"]  # it kept no v1: pushed
    for server, (revision, times) in zip(fleet_devices, v1):
        record = _record(server, name)
        assert (record["revision"], record["provenance"]["version"]) == (revision, "1")
        assert upload_times(server, name)[0] == times[0]  # the same files as before: nothing uploaded

    desired, devices = _tags(name)
    assert (desired["model_uri"], desired["version"], desired["previous_version"]) == (f"models:/{MODEL}/1", "1", "2")
    assert desired["status"] == "rolled-out" and set(devices) == {"1"} and len(devices["1"]) == 4
    code, _, err = fleet_command(capsys, "sync", name, "--fleet", fleet)
    assert code == 0 and {row[2] for row in table_rows(err).values()} == {"unchanged"}
    code, out, _ = fleet_command(capsys, "status", name, "--fleet", fleet)
    assert code == 0 and out.rstrip().endswith("in sync")
    deploy("delete", *target)
