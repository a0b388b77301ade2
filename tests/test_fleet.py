"""Fleets: a fleet file's devices and groups, the desired state in a real `mlflow server`'s registry,
convergence, honest results, `arachne-mlflow fleet status` / `sync`, timeouts and IPv6, against real
device servers on loopback and the real `mlflow deployments` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments.desired_state import SUMMARY_KEY, fit_version_tag
from arachne_mlflow.deployments.targets import resolve_target, settings
from arachne_mlflow.errors import DeviceUnreachableError, InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.fleet.inventory import FleetFileError, load_inventory
from tests.conftest import FLEET_TOKEN
from tests.helpers import models
from tests.helpers.fleet import deploy, fleet_command, fleet_file, on_server, table_rows
from tests.helpers.servers import ServerProcess, free_port

MODEL = "fleet-linear"
X = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def registered(mlflow_server):
    """Registered model `fleet-linear` with versions 1, 2 and 3 (other weights each), on the server."""
    with on_server(mlflow_server):
        for scale in (1.0, -2.0, 0.5):
            arachne_onnx.log_model(models.onnx_linear_scaled(scale), name="model", registered_model_name=MODEL)
    return MODEL


def _version_on(server, name):
    with DeviceClient("127.0.0.1", server.port, token=FLEET_TOKEN) as device:
        record = device.model_record(name)
    return None if record is None else (record["provenance"].get("version"), record["revision"])


def _tags(name):
    """The registered model's tags, and each version's `arachne.devices.<deployment>` tags by version."""
    client = MlflowClient()
    model_tags = client.get_registered_model(MODEL).tags
    versions = {v.version: v.tags for v in client.search_model_versions(f"name = '{MODEL}'")}
    return model_tags, {
        v: json.loads(t[f"arachne.devices.{name}"]) for v, t in versions.items() if f"arachne.devices.{name}" in t
    }


# -- the fleet file ----------------------------------------------------------------------------
def test_fleet_file_devices_groups_and_connections(tmp_path, monkeypatch):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        """
defaults: {port: 6000, token_env: FLEET_TOKEN}
devices:
  cam-1: {address: "10.0.0.5:5051", labels: {site: lyon, arch: aarch64}}
  cam-2: {address: cam-2.local, labels: {site: lyon}, token_env: CAM2_TOKEN, tls: true, ca_cert: ca.pem}
  cam-3: "10.0.0.7"
  cam-6: {address: "[fd00::6]:7000", labels: {site: paris}}
groups:
  lyon: {labels: {site: lyon}}
  canary: [cam-1]
  arm: {labels: {arch: aarch64, site: lyon}}
"""
    )
    monkeypatch.delenv("ARACHNE_FLEET", raising=False)
    fleet = str(path)
    names = lambda uri: [str(d) for d in resolve_target(uri, fleet)]  # noqa: E731
    assert names("arachne-jetson://@lyon") == ["cam-1", "cam-2"]
    assert names("arachne-jetson://@all") == ["cam-1", "cam-2", "cam-3", "cam-6"]
    assert names("arachne-jetson://@canary,cam-3,@lyon") == ["cam-1", "cam-3", "cam-2"]
    assert names("arachne-jetson://@arm") == ["cam-1"]
    # a bare address is the fleet file's device of that address (with its settings), else itself
    assert names("arachne-jetson://10.0.0.5:5051,other-host:5052") == ["cam-1", "other-host:5052"]
    devices = {str(d): d for d in resolve_target("arachne-jetson://@all", fleet)}
    assert (devices["cam-2"].host, devices["cam-2"].port, devices["cam-2"].tls) == ("cam-2.local", 6000, True)
    assert devices["cam-2"].ca_cert == str(tmp_path / "ca.pem")  # relative to the fleet file
    assert (devices["cam-3"].port, devices["cam-6"].host, devices["cam-6"].port) == (6000, "fd00::6", 7000)
    assert devices["cam-6"].address == "[fd00::6]:7000"

    monkeypatch.setenv("FLEET_TOKEN", "t-fleet")
    monkeypatch.setenv("CAM2_TOKEN", "t-cam2")
    connection = settings({"token": "t-config"}).connection
    assert connection.for_device(devices["cam-1"]).token == "t-fleet"  # the file's default variable
    assert connection.for_device(devices["cam-2"]).token == "t-cam2"  # the device's own variable
    assert connection.for_device(Device("other", 1)).token == "t-config"
    monkeypatch.delenv("FLEET_TOKEN")
    assert connection.for_device(devices["cam-1"]).token == "t-config"  # variable unset: the config's

    # the path: -C fleet, else $ARACHNE_FLEET, else the default (which may be missing)
    monkeypatch.setenv("ARACHNE_FLEET", fleet)
    assert [str(d) for d in resolve_target("arachne-jetson://@canary")] == ["cam-1"]
    monkeypatch.setenv("ARACHNE_FLEET", str(tmp_path / "missing.yaml"))
    with pytest.raises(FleetFileError, match="missing.yaml does not exist"):
        resolve_target("arachne-jetson://cam-1")
    monkeypatch.delenv("ARACHNE_FLEET")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_target("arachne-jetson://cam-1:5052,[::1]:7000") == [Device("cam-1", 5052), Device("::1", 7000)]
    with pytest.raises(InvalidInputError, match="names group @lyon but there is no fleet file"):
        resolve_target("arachne-jetson://@lyon")
    with pytest.raises(InvalidInputError, match=r"no group @nope .*groups: \['arm', 'canary', 'lyon'\]"):
        resolve_target("arachne-jetson://@nope", fleet)


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        ("devices:\n  cam-1: {address: a}\n  cam-1: {address: b}\n", 3, "devices.cam-1", "is given twice"),
        ("devices:\n  cam-1: {adress: a}\n", 2, "devices.cam-1.adress", "unknown key"),
        ("devices:\n  cam-1:\n    address: a\n    port: many\n", 4, "devices.cam-1.port", "must be a port number"),
        ("devices:\n  cam-1:\n    labels: {a: b}\n", 3, "devices.cam-1", "needs an address"),
        ("devices:\n  cam-1: {address: 'a b'}\n", 2, "devices.cam-1.address", "is not host"),
        ("devices:\n  cam-1: {address: 'a:1', port: 2}\n", 2, "devices.cam-1.port", "has a port already"),
        ("devices:\n  cam-1: 'a:5051'\n  cam-2: a\n", 3, "devices.cam-2", "has the address of cam-1 (a:5051)"),
        ("devices:\n  cam-1: a\ngroups:\n  g: [cam-1, cam-9]\n", 4, "groups.g", "no device 'cam-9'"),
        ("devices:\n  cam-1: a\ngroups:\n  all: [cam-1]\n", 4, "groups.all", "every device already"),
        ("devices:\n  cam-1: a\ngroups:\n  g: {labels: {}}\n", 4, "groups.g.labels", "at least one label"),
        ("defaults:\n  token_env: 'secret token'\n", 2, "defaults.token_env", "environment variable"),
        ("defaults:\n  tls: maybe\n", 2, "defaults.tls", "true or false"),
        ("devises: {}\n", 1, "devises", "unknown key"),
        ("devices: [cam-1]\n", 1, "devices", "must be a mapping"),
        ("devices:\n  cam-1: {address: a\n", 3, None, "not valid YAML"),
    ],
)
def test_bad_fleet_file_names_file_line_and_key(tmp_path, text, line, key, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(FleetFileError) as raised:
        load_inventory(path)
    text = str(raised.value)
    assert text.startswith(f"{path}:{line}: ") and message in text
    if key:
        assert text.startswith(f"{path}:{line}: {key}: ")


def test_settings_are_checked():
    with pytest.raises(InvalidInputError, match=r"unknown config \['paralel'\]"):
        settings({"paralel": "4"})
    for key, value in (("parallel", "0"), ("min_success", "most"), ("min_success", "120%"), ("connect_timeout", "-1")):
        with pytest.raises(InvalidInputError, match=key):
            settings({key: value})
    assert settings({"min_success": "50%"}).required(5) == 3
    assert settings({"min_success": "2"}).required(5) == 2
    assert settings({"min_success": "9"}).required(5) == 5
    assert settings({}).required(5) == 5
    assert settings({}).workers(100) == 100 and settings({"parallel": "7"}).workers(100) == 7


def test_large_fleet_version_tag_is_summarized():
    entries = {
        f"cam-{i:04d}": {"state": "deployed", "revision": 3, "at": "2026-12-01T10:00:00+00:00"} for i in range(300)
    }
    entries["cam-0042"] = {"state": "failed", "at": "2026-12-01T10:00:00+00:00", "error": "unreachable " * 20}
    assert json.loads(fit_version_tag(entries)) == entries  # fits under MLflow's bound
    text = fit_version_tag(entries, limit=5000)
    assert len(text) <= 5000
    summary = json.loads(text)
    assert summary[SUMMARY_KEY] == {"devices": 300, "deployed": 299, "failed": 1}
    assert summary["cam-0042"]["state"] == "failed"  # failures first, then as many others as fit
    assert 10 < len(summary) < 300


# -- the real CLI, a real registry, real devices -----------------------------------------------
@pytest.mark.slow
def test_group_target_and_registry_tags(fleet_devices, registered, tracking_server, fleet_token_env, tmp_path):
    fleet = fleet_file(tmp_path / "fleet.yaml", fleet_devices)
    name = "tags"
    _, err = deploy(
        "create", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}/1", "-C", f"fleet={fleet}"
    )
    assert "2 of 2 devices with fleet-linear v1" in err
    rows = table_rows(err)
    assert rows["cam-0"][:3] == rows["cam-1"][:3] == ["-", "v1", "deployed"] and set(rows) == {"cam-0", "cam-1"}
    assert _version_on(fleet_devices[0], name)[0] == _version_on(fleet_devices[1], name)[0] == "1"
    assert _version_on(fleet_devices[2], name) is None  # not in the group

    model_tags, version_tags = _tags(name)
    desired = json.loads(model_tags[f"arachne.deploy.{name}"])
    assert desired["target"] == "@lyon" and desired["model_uri"] == f"models:/{MODEL}/1"
    assert (desired["status"], desired["version"], desired["devices"]) == ("rolled-out", "1", {"deployed": 2})
    assert model_tags["arachne.deployed"] == "true"
    assert set(version_tags) == {"1"} and set(version_tags["1"]) == {"cam-0", "cam-1"}
    assert version_tags["1"]["cam-0"]["state"] == "deployed" and version_tags["1"]["cam-0"]["revision"] == 1

    _, err = deploy(
        "update", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}/2", "-C", f"fleet={fleet}"
    )
    assert table_rows(err)["cam-0"][:3] == ["v1", "v2", "deployed"]
    model_tags, version_tags = _tags(name)
    assert json.loads(model_tags[f"arachne.deploy.{name}"])["version"] == "2"
    assert set(version_tags) == {"2"}  # the devices moved off version 1's tag
    assert version_tags["2"]["cam-1"]["revision"] == 2

    deploy("delete", "-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    model_tags, version_tags = _tags(name)
    assert not any(key.startswith("arachne.") for key in model_tags) and version_tags == {}
    assert _version_on(fleet_devices[0], name) is None


@pytest.mark.slow
def test_partial_failure_exits_non_zero_and_names_devices(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path
):
    down = free_port()
    fleet = fleet_file(
        tmp_path / "fleet.yaml", [fleet_devices[0], down], labels={0: {"site": "lyon"}, 1: {"site": "lyon"}}
    )
    name = "partial"
    uri = f"models:/{MODEL}/1"
    _, err = deploy(
        "create", "-t", "arachne-jetson://@lyon", "--name", name, "-m", uri, "-C", f"fleet={fleet}", expect=1
    )
    assert "1 of 2 devices with fleet-linear v1" in err
    assert table_rows(err)["cam-1"][:3] == ["?", "?", "failed"] and "unreachable" in " ".join(table_rows(err)["cam-1"])
    client = get_deploy_client("arachne-jetson://@lyon")
    with pytest.raises(
        MlflowException, match=rf"1 of 2 devices .*failed on cam-1: device server at 127\.0\.0\.1:{down} is unreachable"
    ):
        client.update_deployment(name, uri, config={"fleet": str(fleet), "report": "false"})
    model_tags, version_tags = _tags(name)
    desired = json.loads(model_tags[f"arachne.deploy.{name}"])
    assert (
        desired["status"] == "rolling"
        and "cam-1" in desired["reason"]
        and desired["devices"] == {"deployed": 1, "failed": 1}
    )
    assert version_tags["1"]["cam-1"]["state"] == "failed" and "unreachable" in version_tags["1"]["cam-1"]["error"]
    assert version_tags["1"]["cam-0"]["state"] == "deployed"

    for allowed in ("1", "50%"):
        result = client.update_deployment(
            name, uri, config={"fleet": str(fleet), "min_success": allowed, "report": "false"}
        )
        assert [d["state"] for d in result["devices"]] == ["unchanged", "failed"]
    with pytest.raises(MlflowException, match=r"\(2 required\)|1 of 2 devices"):
        client.update_deployment(name, uri, config={"fleet": str(fleet), "min_success": "2", "report": "false"})
    _, err = deploy("delete", "-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")
    assert table_rows(err)["cam-1"][2] == "never-had-it"  # the ledger lists only its failures: nothing to clean
    deploy("delete", "-t", f"arachne-jetson://127.0.0.1:{fleet_devices[0].port}", "--name", name)  # forgets it anyway
    assert f"arachne.deploy.{name}" not in _tags(name)[0]


@pytest.mark.slow
def test_sync_brings_a_restarted_device_up_to_date(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ARACHNE_FLEET", str(fleet_file(tmp_path / "fleet.yaml", fleet_devices)))
    name = "restart"
    client = get_deploy_client("arachne-jetson://@all")
    client.create_deployment(name, f"models:/{MODEL}/1", config={"report": "false"})
    fleet_devices[2].stop()
    try:
        result = client.update_deployment(name, f"models:/{MODEL}/2", config={"min_success": "2", "report": "false"})
        assert [d["state"] for d in result["devices"]] == ["deployed", "deployed", "failed"]
        code, out, _ = fleet_command(capsys, "status", name)
        assert code == 3 and "device cam-2 is unreachable (last known: v1 deployed; v2 failed)" in out  # unchecked
    finally:
        fleet_devices[2].start()
    assert _version_on(fleet_devices[2], name) == ("1", 1)  # back with what it had

    code, _, err = fleet_command(capsys, "sync", name)
    assert code == 0, err
    assert table_rows(err)["cam-2"][:3] == ["v1", "v2", "deployed"] and table_rows(err)["cam-0"][:3] == [
        "v2",
        "v2",
        "unchanged",
    ]
    assert [_version_on(s, name) for s in fleet_devices] == [("2", 2), ("2", 2), ("2", 2)]
    tags = _tags(name)
    assert set(tags[1]) == {"2"} and json.loads(tags[0][f"arachne.deploy.{name}"])["status"] == "rolled-out"

    code, out, _ = fleet_command(capsys, "status", name, "--json")
    assert code == 0 and json.loads(out)[0]["in_sync"] is True
    code, _, err = fleet_command(capsys, "sync")  # every deployment; this one is everywhere already
    assert code == 0 and {row[2] for row in table_rows(err).values()} == {"unchanged"}
    assert _tags(name) == tags  # nothing written, not even a time stamp
    assert [_version_on(s, name) for s in fleet_devices] == [("2", 2), ("2", 2), ("2", 2)]

    fleet_devices[1].stop()  # a delete that cannot reach every device: sync finishes it when the device is back
    try:
        with pytest.raises(
            MlflowException, match="2 of 3 devices without it; the registry keeps it as deleting.*failed on cam-1"
        ):
            client.delete_deployment(name, config={"report": "false"})
        assert json.loads(_tags(name)[0][f"arachne.deploy.{name}"])["status"] == "deleting"
        assert set(_tags(name)[1]["2"]) == {"cam-1"}  # the devices that dropped it are off the tag
    finally:
        fleet_devices[1].start()
    code, _, err = fleet_command(capsys, "sync", name)
    assert code == 0 and table_rows(err)["cam-1"][:3] == ["v2", "-", "deleted"]
    assert [_version_on(s, name) for s in fleet_devices] == [None, None, None]
    assert f"arachne.deploy.{name}" not in _tags(name)[0] and _tags(name)[1] == {}


@pytest.mark.slow
def test_alias_move_is_drift_and_sync_rolls_it_out(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("ARACHNE_FLEET", str(fleet_file(tmp_path / "fleet.yaml", fleet_devices)))
    registry = MlflowClient()
    registry.set_registered_model_alias(MODEL, "moving", "1")
    name = "alias"
    deploy("create", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}@moving")
    assert json.loads(_tags(name)[0][f"arachne.deploy.{name}"])["model_uri"] == f"models:/{MODEL}@moving"
    registry.set_registered_model_alias(MODEL, "moving", "3")

    code, out, _ = fleet_command(capsys, "status", "--json", name)
    assert code == 1  # drift
    status = json.loads(out)[0]
    assert (status["desired_version"], status["rolled_out_version"], status["in_sync"]) == ("3", "1", False)
    assert status["drift"][:2] == ["alias moving moved to v3 (v1 was rolled out)", "device cam-0 runs v1"]
    assert [(d["device"], d["desired"], d["actual"]) for d in status["devices"]] == [
        ("cam-0", "v3", "v1"),
        ("cam-1", "v3", "v1"),
    ]
    _, text, _ = fleet_command(capsys, "status", name)
    assert "drift: alias moving moved to v3 (v1 was rolled out); device cam-0 runs v1; device cam-1 runs v1" in text

    code, _, err = fleet_command(capsys, "sync", name)
    assert code == 0 and table_rows(err)["cam-1"][:3] == ["v1", "v3", "deployed"]
    assert [_version_on(s, name)[0] for s in fleet_devices[:2]] == ["3", "3"]
    with DeviceClient("127.0.0.1", fleet_devices[0].port, token=FLEET_TOKEN) as device:
        assert device.model_record(name)["provenance"]["alias"] == "moving"
        np.testing.assert_allclose(
            device.infer(name, {"x": X})["y"], _expected(models.onnx_linear_scaled(0.5)), rtol=1e-6
        )
    code, out, _ = fleet_command(capsys, "status", name)
    assert out.rstrip().endswith("in sync")
    deploy("delete", "-t", "arachne-jetson://@lyon", "--name", name)


@pytest.mark.slow
def test_device_added_to_a_group_gets_the_model(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path, capsys, monkeypatch
):
    fleet = tmp_path / "fleet.yaml"
    monkeypatch.setenv("ARACHNE_FLEET", str(fleet))
    fleet_file(fleet, fleet_devices, labels={0: {"site": "lyon"}})
    name = "joined"
    deploy("create", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}/1")
    assert [_version_on(s, name) for s in fleet_devices] == [("1", 1), None, None]

    fleet_file(fleet, fleet_devices, labels={0: {"site": "lyon"}, 1: {"site": "lyon"}})  # cam-1 joins lyon
    code, out, _ = fleet_command(capsys, "status", name)
    assert code == 1 and "device cam-1 lacks it" in out
    code, _, err = fleet_command(capsys, "sync", name)
    assert code == 0 and table_rows(err)["cam-1"][:3] == ["-", "v1", "deployed"]

    fleet_file(
        fleet, fleet_devices, labels={0: {"site": "lyon"}, 1: {"site": "lyon"}, 2: {"site": "lyon"}}
    )  # and cam-2
    _, err = deploy("update", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}/1")
    assert [table_rows(err)[f"cam-{i}"][2] for i in range(3)] == ["unchanged", "unchanged", "deployed"]
    assert [_version_on(s, name) for s in fleet_devices] == [("1", 1), ("1", 1), ("1", 1)]
    deploy("delete", "-t", "arachne-jetson://@lyon", "--name", name)


@pytest.mark.slow
def test_sync_watch_is_the_controller(
    fleet_devices, registered, mlflow_server, tracking_server, fleet_token_env, tmp_path
):
    fleet = tmp_path / "fleet.yaml"
    fleet_file(fleet, fleet_devices, labels={0: {"site": "lyon"}})
    name = "watched"
    deploy("create", "-t", "arachne-jetson://@lyon", "--name", name, "-m", f"models:/{MODEL}/1", "-C", f"fleet={fleet}")
    fleet_file(fleet, fleet_devices, labels={0: {"site": "lyon"}, 2: {"site": "lyon"}})  # cam-2 joins
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "ARACHNE_FLEET": str(fleet)}
    command = [sys.executable, "-m", "arachne_mlflow.cli", "fleet", "sync", name, "--watch", "0.5"]
    with open(tmp_path / "watch.log", "wb") as log:
        watcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while _version_on(fleet_devices[2], name) is None:  # a controller's work shows on the device: poll it
                assert watcher.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
                time.sleep(0.5)
        finally:
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(timeout=30) == 0
    assert _version_on(fleet_devices[2], name) == ("1", 1) and _version_on(fleet_devices[1], name) is None
    deploy("delete", "-t", "arachne-jetson://@lyon", "--name", name, "-C", f"fleet={fleet}")


@pytest.mark.slow
def test_create_refuses_an_existing_deployment_unless_converging(
    fleet_devices, registered, tracking_server, fleet_token_env, tmp_path
):
    target = f"arachne-jetson://127.0.0.1:{fleet_devices[0].port},127.0.0.1:{fleet_devices[1].port}"
    client = get_deploy_client(target)
    client.create_deployment("exists", f"models:/{MODEL}/1", config={"report": "false"})
    with pytest.raises(MlflowException, match="deployment 'exists' exists: the registry wants models:/fleet-linear/1"):
        client.create_deployment("exists", f"models:/{MODEL}/2")
    client.delete_deployment("exists", config={"report": "false"})

    # on a device only (a local path records nothing in the registry)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/1", dst_path=str(tmp_path / "m"))
    get_deploy_client(f"arachne-jetson://127.0.0.1:{fleet_devices[1].port}").create_deployment(
        "exists", local, config={"report": "false"}
    )
    with pytest.raises(
        MlflowException, match=rf"deployment 'exists' exists on 127\.0\.0\.1:{fleet_devices[1].port}: update it"
    ):
        client.create_deployment("exists", f"models:/{MODEL}/2")
    assert _version_on(fleet_devices[0], "exists") is None  # nothing pushed anywhere
    result = client.create_deployment("exists", f"models:/{MODEL}/2", config={"converge": "true", "report": "false"})
    assert [(d["before"], d["after"], d["state"]) for d in result["devices"]][0] == ("-", "v2", "deployed")
    assert result["devices"][1]["after"] == "v2" and result["devices"][1]["state"] == "deployed"

    with pytest.raises(MlflowException, match="no deployment 'nowhere' to update"):
        client.update_deployment("nowhere", f"models:/{MODEL}/1")
    result = client.update_deployment("exists", config={"report": "false"})  # no model URI: the registry's
    assert {d["state"] for d in result["devices"]} == {"unchanged"}
    client.delete_deployment("exists", config={"report": "false"})


# -- timeouts and IPv6 -------------------------------------------------------------------------
@contextlib.contextmanager
def _silent_listener(fill_backlog: bool):
    """A loopback port that never answers: connections are accepted by the kernel and left unread
    (a hung device), or, with the backlog filled, new ones are never accepted (one that is off)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0 if fill_backlog else 16)
    fillers = []
    if fill_backlog:
        for _ in range(2):  # Linux queues backlog + 1; the next SYN is dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(server.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
    try:
        yield server.getsockname()[1]
    finally:
        for sock in (*fillers, server):
            sock.close()


def test_connect_timeout_bounds_an_unreachable_device():
    with _silent_listener(fill_backlog=True) as port:
        with DeviceClient("127.0.0.1", port, connect_timeout=0.5, timeout=60) as device:
            for call in (device.live, lambda: device.infer("m", {"x": X})):  # requests, then the transport
                start = time.monotonic()
                with pytest.raises(DeviceUnreachableError, match=rf"127\.0\.0\.1:{port} is unreachable"):
                    call()
                assert time.monotonic() - start < 10  # the connect timeout, not the 60 s one


def test_a_hung_device_costs_its_timeout_not_more():
    with _silent_listener(fill_backlog=False) as port:
        with DeviceClient("127.0.0.1", port, connect_timeout=5, timeout=0.5) as device:
            for call in (device.live, lambda: device.infer("m", {"x": X})):
                start = time.monotonic()
                with pytest.raises(DeviceUnreachableError, match="unreachable"):
                    call()
                assert time.monotonic() - start < 10


@pytest.mark.slow
def test_predict_passes_over_a_hung_device_quickly(fleet_devices, registered, tracking_server, fleet_token_env):
    target = f"arachne-jetson://127.0.0.1:{fleet_devices[0].port}"
    get_deploy_client(target).create_deployment("hung", f"models:/{MODEL}/1", config={"report": "false"})
    with _silent_listener(fill_backlog=False) as hung:
        client = get_deploy_client(f"arachne-jetson://127.0.0.1:{hung},127.0.0.1:{fleet_devices[0].port}")
        start = time.monotonic()
        predictions = client.predict("hung", X)["predictions"]
        assert time.monotonic() - start < 30  # the short probe of the hung device, not the full timeout
    np.testing.assert_allclose(predictions, _expected(models.onnx_linear_scaled(1.0)), rtol=1e-6)
    get_deploy_client(target).delete_deployment("hung", config={"report": "false"})


@pytest.mark.slow
def test_ipv6_literals_end_to_end(registered, tracking_server, fleet_token_env, tmp_path):
    server = ServerProcess(tmp_path / "store", token=FLEET_TOKEN, host="::1").start()
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/1", dst_path=str(tmp_path / "m"))
    try:
        for host in ("::1", "[::1]"):
            with DeviceClient(host, server.port, token=FLEET_TOKEN) as device:
                assert device.url == f"http://[::1]:{server.port}" and device.live()
                device.upload_model("v6", model_dir)
                out = device.infer("v6", {"x": X})["y"]  # the transport's Host header, too
                np.testing.assert_allclose(out, _expected(models.onnx_linear_scaled(1.0)), rtol=1e-6)
                assert device.model_record("v6")["revision"] == 1
        target = f"arachne-jetson://[::1]:{server.port}"
        client = get_deploy_client(target)
        result = client.create_deployment("v6-fleet", f"models:/{MODEL}/1", config={"report": "false"})
        assert result["devices"][0]["device"] == f"[::1]:{server.port}"
        np.testing.assert_allclose(
            client.predict("v6-fleet", X)["predictions"], _expected(models.onnx_linear_scaled(1.0)), rtol=1e-6
        )
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"devices": {"v6": {"address": f"[::1]:{server.port}"}}}))
        assert json.loads(_tags("v6-fleet")[0]["arachne.deploy.v6-fleet"])["target"] == f"[::1]:{server.port}"
        result = get_deploy_client("arachne-jetson://v6").update_deployment(
            "v6-fleet", f"models:/{MODEL}/2", config={"fleet": str(fleet), "report": "false"}
        )
        assert (result["devices"][0]["device"], result["devices"][0]["after"]) == ("v6", "v2")
        client.delete_deployment("v6-fleet", config={"report": "false"})
    finally:
        server.stop()


def _expected(onnx_model, x=X):
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init("onnx", model_content=onnx_model.SerializeToString()) as module:
        return module.infer([x])[0]
