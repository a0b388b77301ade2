"""The registry record is a ledger of what commands did, and host tools contact only the fleet file's
addresses: a typo'd target, one device of a group, a device gone for good, the exit-code table, a hostile
or malformed `arachne.deploy.*` tag. Real device servers, a real `mlflow server`, the real `mlflow
deployments` CLI in a subprocess (PYTHONPATH set to this checkout)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments.desired_state import WRITER
from tests.conftest import FLEET_TOKEN
from tests.helpers import models
from tests.helpers.fleet import fleet_command, fleet_file, on_server
from tests.helpers.servers import free_port

FLEET_DEVICES = 2
MODEL = "truth-linear"
ROOT = Path(__file__).resolve().parents[1]


class CountingListener:
    """A plain TCP listener on loopback that counts the connections it is offered (and closes them)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.running = False
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def registered(mlflow_server):
    with on_server(mlflow_server, experiment="arachne-fleet-truth"):
        for scale in (1.0, -2.0):
            from arachne_mlflow.flavors import onnx as arachne_onnx

            arachne_onnx.log_model(models.onnx_linear_scaled(scale), name="model", registered_model_name=MODEL)
    return MODEL


@pytest.fixture
def fleet(tmp_path, fleet_devices, mlflow_server, registered, monkeypatch):
    """cam-0, cam-1 (group @lyon, and @first: cam-0) in a fleet file; the environment of every command."""
    path = fleet_file(tmp_path / "fleet.yaml", fleet_devices)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "ARACHNE_FLEET": str(path),
        "ARACHNE_TOKEN": FLEET_TOKEN,
        "ARACHNE_CONNECT_TIMEOUT": "1",
    }
    for key in ("MLFLOW_TRACKING_URI", "ARACHNE_FLEET", "ARACHNE_TOKEN", "ARACHNE_CONNECT_TIMEOUT"):
        monkeypatch.setenv(key, env[key])
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(mlflow_server)
    yield path, env
    mlflow.set_tracking_uri(previous)


def cli(env, *args, expect=0):
    """`mlflow deployments ...` in a subprocess; returns stdout + stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "deployments", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == (expect == 0), output
    return output


def deploy_tag(name):
    tags = MlflowClient().get_registered_model(MODEL).tags
    value = tags.get(f"arachne.deploy.{name}")
    return None if value is None else json.loads(value)


def version_on(server, name):
    with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
        record = device.model_record(name)
    return None if record is None else record["provenance"].get("version")


def status(capsys, *names, fleet_path=None):
    extra = ["--fleet", fleet_path] if fleet_path else []
    return fleet_command(capsys, "status", *names, *extra)


def test_typod_target_records_nothing_and_the_name_stays_free(fleet, fleet_devices, capsys):
    path, env = fleet
    closed = free_port()
    out = cli(
        env,
        "create",
        "-t",
        f"arachne-jetson://127.0.0.1:{closed}",
        "--name",
        "typo",
        "-m",
        f"models:/{MODEL}/1",
        expect=1,
    )
    assert "unreachable" in out and "nothing recorded" in out
    assert deploy_tag("typo") is None  # nothing happened, so nothing is recorded

    out = cli(env, "create", "-t", "arachne-jetson://cam-9", "--name", "typo", "-m", f"models:/{MODEL}/1", expect=1)
    assert f"no device 'cam-9' in fleet file {path}" in out  # said as missing from the file, not a DNS failure
    assert deploy_tag("typo") is None

    code, out, _ = status(capsys, "typo")
    assert code == 2 and "no such deployment" in out and "in sync" not in out

    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "typo", "-m", f"models:/{MODEL}/1")  # name reusable
    assert deploy_tag("typo")["target"] == "@lyon"
    assert status(capsys, "typo")[0] == 0
    cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "typo")
    assert deploy_tag("typo") is None and version_on(fleet_devices[0], "typo") is None


def test_a_command_on_one_device_of_a_group_changes_that_device_only(fleet, fleet_devices, capsys):
    _, env = fleet
    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "grp", "-m", f"models:/{MODEL}/1")
    assert status(capsys, "grp")[0] == 0

    # a failed update of one device (refused token) leaves the deployment's target and status as they were
    out = cli(env, "update", "-t", "arachne-jetson://cam-1", "--name", "grp", "-C", "token=wrong", expect=1)
    assert "cam-1" in out
    tag = deploy_tag("grp")
    assert (tag["target"], tag["status"], tag["model_uri"]) == ("@lyon", "rolled-out", f"models:/{MODEL}/1")
    assert status(capsys, "grp")[0] == 0

    # one device moved to another version: recorded for that device, shown as drift, the target kept
    cli(env, "update", "-t", "arachne-jetson://cam-0", "--name", "grp", "-m", f"models:/{MODEL}/2")
    assert deploy_tag("grp")["target"] == "@lyon"
    code, out, _ = status(capsys, "grp")
    assert code == 1 and "device cam-0 runs v2" in out

    # delete on one device: the other keeps serving and the record stays; sync puts it back
    cli(env, "delete", "-t", "arachne-jetson://cam-0", "--name", "grp")
    assert version_on(fleet_devices[0], "grp") is None and version_on(fleet_devices[1], "grp") == "1"
    assert deploy_tag("grp")["target"] == "@lyon"
    code, out, _ = status(capsys, "grp")
    assert code == 1 and "device cam-0 lacks it" in out
    assert fleet_command(capsys, "sync", "grp")[0] == 0
    assert version_on(fleet_devices[0], "grp") == "1" and status(capsys, "grp")[0] == 0

    # retargeting is explicit
    cli(env, "update", "-t", "arachne-jetson://cam-1", "--name", "grp", "-C", "retarget=true")
    assert deploy_tag("grp")["target"] == "cam-1"
    cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "grp")
    assert deploy_tag("grp") is None and version_on(fleet_devices[1], "grp") is None


def test_a_device_gone_for_good_is_forgotten(fleet, fleet_devices, capsys):
    path, env = fleet
    fleet_file(path, fleet_devices, groups={"lyon": {"labels": {"site": "lyon"}}})
    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "gone", "-m", f"models:/{MODEL}/1")
    # cam-1 is gone for good: its address now answers nothing
    fleet_file(path, [fleet_devices[0], free_port()], groups={"lyon": {"labels": {"site": "lyon"}}})
    out = cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "gone", expect=1)
    assert "unreachable" in out and deploy_tag("gone")["status"] == "deleting"
    out = cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "gone", "-C", "min_success=0")
    assert "keeps it as deleting" in out and "forget=true" in out
    assert fleet_command(capsys, "sync", "gone")[0] == 1
    out = cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "gone", "-C", "forget=true")
    assert "forgotten" in out and deploy_tag("gone") is None
    assert status(capsys, "gone")[0] == 2
    code, _, err = fleet_command(capsys, "sync")
    assert "gone" not in err
    with DeviceClient("127.0.0.1", fleet_devices[1].port, token=FLEET_TOKEN) as device:  # (the real cam-1)
        device.delete_model("gone")


def test_a_device_that_never_had_it_needs_no_cleaning(fleet, fleet_devices, capsys):
    path, env = fleet
    fleet_file(path, [fleet_devices[0], free_port()], groups={"lyon": {"labels": {"site": "lyon"}}})
    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "half", "-m", f"models:/{MODEL}/1", expect=1)
    assert deploy_tag("half")["status"] == "rolling"  # cam-0 has it: recorded, with cam-1's failure
    code, out, _ = status(capsys, "half")
    assert code == 3 and "unreachable" in out
    out = cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "half")
    assert "never-had-it" in out and deploy_tag("half") is None


def test_exit_codes(fleet, fleet_devices, capsys, tmp_path, monkeypatch):
    path, env = fleet
    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "codes", "-m", f"models:/{MODEL}/1")
    assert status(capsys, "codes")[0] == 0
    assert fleet_command(capsys, "sync", "codes")[0] == 0
    assert status(capsys, "nope")[0] == 2
    assert fleet_command(capsys, "sync", "nope")[0] == 2
    assert fleet_command(capsys, "rollback", "nope")[0] == 2
    missing = str(tmp_path / "missing.yaml")
    code, _, err = status(capsys, "codes", fleet_path=missing)
    assert code == 2 and "missing.yaml does not exist" in err
    assert fleet_command(capsys, "sync", "--fleet", missing)[0] == 2
    with DeviceClient("127.0.0.1", fleet_devices[1].port, token=FLEET_TOKEN) as device:
        device.delete_model("codes")
    assert status(capsys, "codes")[0] == 1  # drift
    monkeypatch.setenv("ARACHNE_TOKEN", "wrong")
    code, out, _ = status(capsys, "codes")
    assert code == 3 and "error" in out  # every device answers 401: could not check
    monkeypatch.setenv("ARACHNE_TOKEN", FLEET_TOKEN)
    assert fleet_command(capsys, "sync", "codes")[0] == 0 and status(capsys, "codes")[0] == 0
    cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "codes")


def test_hostile_and_malformed_tags_contact_nothing_and_stop_nothing(fleet, fleet_devices, capsys):
    _, env = fleet
    listener = CountingListener()
    client = MlflowClient()
    try:
        cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "good", "-m", f"models:/{MODEL}/1")
        cli(env, "create", "-t", "arachne-jetson://@first", "--name", "edited", "-m", f"models:/{MODEL}/1")
        # row 3: a recorded target edited to add an address; another model's tags naming one
        edited = deploy_tag("edited")
        edited["target"] = f"@first,127.0.0.1:{listener.port}"
        client.set_registered_model_tag(MODEL, "arachne.deploy.edited", json.dumps(edited))
        client.create_registered_model("truth-hostile")
        hostile = {**edited, "target": f"127.0.0.1:{listener.port}", "model_uri": f"models:/{MODEL}/1", "by": WRITER}
        client.set_registered_model_tag("truth-hostile", "arachne.deployed", "true")
        client.set_registered_model_tag("truth-hostile", "arachne.deploy.x", json.dumps(hostile))
        # row 4: a malformed tag, and one nested deeper than any parser should follow
        client.set_registered_model_tag("truth-hostile", "arachne.deploy.broken", "{not json")
        client.set_registered_model_tag("truth-hostile", "arachne.deploy.deep", "[" * 4900)
        with DeviceClient("127.0.0.1", fleet_devices[1].port, token=FLEET_TOKEN) as device:
            device.delete_model("good")  # drift that sync must still repair

        code, _, err = fleet_command(capsys, "sync")
        assert code == 1 and "Traceback" not in err
        assert version_on(fleet_devices[1], "good") == "1"  # the healthy deployment converged
        assert "not contacted" in err and "'edited'" in err and "'x'" in err
        assert "arachne.deploy.broken" in err and "arachne.deploy.deep" in err
        code, out, _ = status(capsys)
        assert code == 3 and "objects or arrays" in out and "not json" not in out
        assert fleet_command(capsys, "rollback", "x")[0] != 0
        assert listener.connections == 0  # no request, hence no token, went to the address
        # the broken tags can be removed by the user's own command
        cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "broken")
        assert "arachne.deploy.broken" not in client.get_registered_model("truth-hostile").tags
    finally:
        listener.close()
        client.delete_registered_model("truth-hostile")
        for name in ("good", "edited"):
            client.delete_registered_model_tag(MODEL, f"arachne.deploy.{name}")
            for server in fleet_devices:
                with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
                    if device.model_record(name) is not None:
                        device.delete_model(name)
    assert listener.connections == 0


def test_unset_token_env_is_named_before_any_request(fleet, fleet_devices, tmp_path):
    path, env = fleet
    listener = CountingListener()
    try:
        extra = {"cam-t": {"address": f"127.0.0.1:{listener.port}", "token_env": "TRUTH_UNSET_TOKEN"}}
        fleet_file(path, fleet_devices, extra=extra)
        env = {k: v for k, v in env.items() if k != "TRUTH_UNSET_TOKEN"}
        out = cli(env, "create", "-t", "arachne-jetson://cam-t", "--name", "tok", "-m", f"models:/{MODEL}/1", expect=1)
        assert "TRUTH_UNSET_TOKEN" in out and "is not set" in out
        assert listener.connections == 0 and deploy_tag("tok") is None
    finally:
        listener.close()


def test_list_of_a_group_shows_an_absent_device(fleet, fleet_devices):
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client("arachne-jetson://@first")
    client.create_deployment("solo", f"models:/{MODEL}/1")
    try:
        listed = {item["name"]: item for item in get_deploy_client("arachne-jetson://@lyon").list_deployments()}
        states = {d["device"]: d["state"] for d in listed["solo"]["devices"]}
        assert states == {"cam-0": "READY", "cam-1": "absent"}
    finally:
        client.delete_deployment("solo")


def test_a_record_of_an_earlier_release_is_adopted_by_an_update(fleet, fleet_devices, capsys):
    path, env = fleet
    cli(env, "create", "-t", "arachne-jetson://@lyon", "--name", "older", "-m", f"models:/{MODEL}/1")
    earlier = {key: value for key, value in deploy_tag("older").items() if key != "by"}
    MlflowClient().set_registered_model_tag(MODEL, "arachne.deploy.older", json.dumps(earlier))
    code, _, err = fleet_command(capsys, "sync", "older")
    assert code != 0 and "not written by" in err  # not acted on
    cli(env, "update", "-t", "arachne-jetson://@lyon", "--name", "older", "-m", f"models:/{MODEL}/1")
    assert deploy_tag("older")["by"] == WRITER
    assert fleet_command(capsys, "sync", "older")[0] == 0 and status(capsys, "older")[0] == 0
    cli(env, "delete", "-t", "arachne-jetson://@lyon", "--name", "older")
