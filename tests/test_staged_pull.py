"""Staged pull rollouts (`arachne-mlflow fleet pull-rollout`): real device servers following a real
`mlflow server`, the host moving their alias wave by wave through the rollout tag they read.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import threading
import time
from datetime import datetime

import pytest
import yaml

from arachne_mlflow.cli import main
from arachne_mlflow.deployments.desired_state import HALTED, ROLLED_OUT, DesiredState
from arachne_mlflow.deployments.pull_rollout import ordered, plan_of, pull_settings
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.protocol.staged_pull import (
    ROLLOUT_TAG,
    RolloutTag,
    admit_after,
    position,
    spread_fraction,
    wanted_version,
)
from arachne_mlflow.server.pull.staged import wait_spread
from tests.helpers.servers import ServerProcess
from tests.helpers.waiting import wait_for
from tests.test_pull import (  # noqa: F401 (pull_models: a fixture)
    _client,
    _device_record,
    _environment,
    _record,
    _register,
    _running,
    _unique,
    pull_models,
)

DEVICES = 4


# -- the contract both ends read (no processes) ----------------------------------------------------
def test_positions_and_spread_are_stable_in_range_and_spread_out():
    names = [f"cam-{i:04d}" for i in range(2000)]
    positions = [position("detector", n) for n in names]
    assert positions == [position("detector", n) for n in names]  # the same on every call (and machine: sha256)
    assert all(0 <= p < 1 for p in positions)
    assert len(set(positions)) == len(names)
    for values in (positions, [spread_fraction(n) for n in names]):
        assert 0.45 < statistics.mean(values) < 0.55  # uniform: mean 1/2...
        assert all(
            40 < sum(a <= v < a + 0.05 for v in values) < 160 for a in [i / 20 for i in range(20)]
        )  # ...no clump
    assert position("detector", "cam-0001") != position("classifier", "cam-0001")  # an order per model
    assert spread_fraction("cam-0001") != position("detector", "cam-0001")


def test_the_tag_admits_devices_below_the_threshold_and_keeps_the_others_on_from():
    fleet = sorted(position("det", f"cam-{i}") for i in range(10))
    admit = admit_after(fleet, 2)  # the first three
    assert fleet[2] < admit <= fleet[3] and admit_after(fleet, 9) == 1.0
    tag = RolloutTag("prod", "3", admit, wave=1).to_json()
    wanted = {f"cam-{i}": wanted_version("4", {ROLLOUT_TAG: tag}, "prod", "det", f"cam-{i}") for i in range(10)}
    assert sorted(wanted.values()) == ["3"] * 7 + ["4"] * 3
    assert wanted_version("4", {ROLLOUT_TAG: tag}, "staging", "det", "cam-0") == "4"  # another alias's rollout
    assert wanted_version("4", {ROLLOUT_TAG: tag}, None, "det", "cam-0") == "4"  # a pinned version
    halted = RolloutTag("prod", "3", 1.0, state="halted").to_json()
    assert {wanted_version("4", {ROLLOUT_TAG: halted}, "prod", "det", f"cam-{i}") for i in range(10)} == {"3"}
    first = RolloutTag("prod", None, 0.0).to_json()  # nothing to keep: a device not admitted keeps what it has
    assert wanted_version("4", {ROLLOUT_TAG: first}, "prod", "det", "cam-0") is None
    for bad in ("", "[]", "{", '{"alias": "prod", "admit": 2, "state": "rolling"}', "x" * 5000):
        assert wanted_version("4", {ROLLOUT_TAG: bad}, "prod", "det", "cam-0") == "4"  # not ours: ignored
    assert RolloutTag.parse('{"alias": "prod", "from": "../3", "admit": 0.5, "state": "rolling"}') is None
    assert len(RolloutTag("prod", "123456", 0.123456789012345678, wave=99).to_json()) < 120  # whatever the fleet


def test_the_command_takes_a_pushs_strategy_keys_and_refuses_what_needs_the_device():
    options, waits = pull_settings({"strategy": "canary", "canary": "1", "batch": "50%", "wave_timeout": "30"})
    assert options.strategy.name == "canary" and waits.wave_timeout == 30.0
    devices = [Device("127.0.0.1", 5000 + i, name=f"cam-{i}") for i in range(6)]
    waves = options.strategy.batches(ordered(devices, "det"))
    assert [len(w) for w in waves] == [1, 3, 2]
    assert [str(d) for w in waves for d in w] == sorted((str(d) for d in devices), key=lambda n: position("det", n))
    for bad in ({"gate_max_p99_ms": "5"}, {"token": "x"}, {"wave_timeout": "0"}):
        with pytest.raises(InvalidInputError):
            pull_settings(bad)


def test_the_plan_starts_from_the_aliass_version_and_an_interrupted_rollout_goes_on_where_it_was(
    mlflow_server,
    pull_models,  # noqa: F811
):
    dirs, _ = pull_models
    client, registered = _client(mlflow_server), _unique("plan")
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    try:
        with pytest.raises(InvalidInputError, match="no alias 'prod'"):
            plan_of("det", f"models:/{registered}/{v2}", "prod", "@pullers", client)
        client.set_registered_model_alias(registered, "prod", v1)
        plan = plan_of("det", f"models:/{registered}/{v2}", "prod", "@pullers", client)
        assert (plan.from_version, plan.version, plan.admitted) == (v1, v2, 0.0)
        client.set_model_version_tag(registered, v2, ROLLOUT_TAG, RolloutTag("prod", v1, 0.3, wave=2).to_json())
        client.set_registered_model_alias(registered, "prod", v2)  # interrupted in its second wave
        plan = plan_of("det", f"models:/{registered}/{v2}", "prod", "@pullers", client)
        assert (plan.from_version, plan.version, plan.admitted) == (v1, v2, 0.3)
        client.set_model_version_tag(registered, v2, ROLLOUT_TAG, RolloutTag("prod", v1, 0.3, 2, HALTED).to_json())
        plan = plan_of("det", f"models:/{registered}/{v2}", "prod", "@pullers", client)  # halted: from the start
        assert (plan.from_version, plan.version, plan.admitted) == (v1, v2, 0.0)
    finally:
        client.delete_registered_model(registered)


# -- real devices ----------------------------------------------------------------------------------
@pytest.fixture
def pull_fleet(tmp_path, mlflow_server, monkeypatch):
    """Start following devices named in a fleet file (group `pullers`); each one's name given."""
    started = []

    def start(registered, deployment, names, extra=None):
        fleet = {"devices": {}, "groups": {"pullers": list(names)}}
        for name in names:
            args = [
                "--follow",
                f"{deployment}=models:/{registered}@prod",
                "--follow-interval",
                "0.5",
                "--follow-spread",
                "0",
            ]
            args += ["--device-name", name, *(extra or {}).get(name, ())]
            server = ServerProcess(tmp_path / name, extra_args=args, env=_environment(mlflow_server))
            started.append(server.start())
            fleet["devices"][name] = {"address": f"127.0.0.1:{server.port}"}
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(fleet))
        monkeypatch.setenv("ARACHNE_FLEET", str(path))
        return {name: server for name, server in zip(names, started[-len(names) :])}

    yield start
    for server in started:
        server.stop()


def _names(registered):
    """The fleet's device names in the order a staged rollout of `registered` admits them."""
    names = [f"cam-{i}" for i in range(DEVICES)]
    return [str(d) for d in ordered([Device("127.0.0.1", 1, name=n) for n in names], registered)]


def _rollout(name, registered, version, *config):
    config = ["-C", "wave_timeout=90", "-C", "poll=0.2", "-C", "report=false", *config]
    return main(["fleet", "pull-rollout", name, f"models:/{registered}/{version}", "--alias", "prod", *config])


def _installed_at(device, name):
    return datetime.fromisoformat(_record(device, name)["uploaded_at"])


@pytest.mark.slow
def test_a_staged_pull_goes_wave_by_wave_and_ends_with_every_device_on_the_new_version(
    tracking_server,
    pull_models,  # noqa: F811
    pull_fleet,
    caplog,
):
    dirs, _ = pull_models
    client, registered, name = _client(tracking_server), _unique("staged"), _unique("det")
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    client.set_registered_model_alias(registered, "prod", v1)
    names = _names(registered)
    devices = pull_fleet(registered, name, names)
    for device in devices.values():
        wait_for(lambda: _running(device, name) == v1)
    try:
        with caplog.at_level(logging.INFO, logger="arachne_mlflow.deployments.rollout"):
            code = _rollout(name, registered, v2, "--target", "@pullers", "-C", "canary=1", "-C", "batch=2")
        assert code == 0
        waves = [r.getMessage() for r in caplog.records if "wave" in r.getMessage()]
        assert waves == [
            f"rollout of '{name}': wave 1 of 3 ({names[0]}): 1 deployed",
            f"rollout of '{name}': wave 2 of 3 ({names[1]}, {names[2]}): 2 deployed",
            f"rollout of '{name}': wave 3 of 3 ({names[3]}): 1 deployed",
        ]
        assert all(_running(devices[n], name) == v2 for n in names)
        canary = _installed_at(devices[names[0]], name)
        # the others were admitted after it (the record's time has a one-second resolution: a wave may follow
        # within the same second; the wave lines above give the order)
        assert all(canary <= _installed_at(devices[n], name) for n in names[1:])
        wave_2 = max(_installed_at(devices[n], name) for n in names[1:3])
        assert wave_2 <= _installed_at(devices[names[3]], name)
        for n in names:
            assert _device_record(client, registered, name, n) == {"version": v2, "state": "deployed", "revision": 2}
        assert ROLLOUT_TAG not in client.get_model_version(registered, v2).tags  # the alias alone says it now
        assert client.get_model_version_by_alias(registered, "prod").version == v2
        desired = DesiredState(client).find(name)
        assert (desired.status, desired.version, desired.model_uri) == (ROLLED_OUT, v2, f"models:/{registered}@prod")
        assert desired.devices == {"deployed": DEVICES} and desired.strategy["name"] == "canary"
        assert _rollout(name, registered, v2) == 0  # the alias names it already: nothing to do
    finally:
        client.delete_registered_model(registered)


@pytest.mark.slow
def test_a_staged_pull_of_a_model_that_fails_its_devices_stops_after_the_canary_wave(
    tracking_server,
    pull_models,  # noqa: F811
    pull_fleet,
    capsys,
):
    dirs, _ = pull_models
    client, registered, name = _client(tracking_server), _unique("halts"), _unique("det")
    v1, bad = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["corrupt"])
    client.set_registered_model_alias(registered, "prod", v1)
    names = _names(registered)
    devices = pull_fleet(registered, name, names)
    for device in devices.values():
        wait_for(lambda: _running(device, name) == v1)
    try:
        code = _rollout(name, registered, bad, "--target", "@pullers", "-C", "canary=1", "-C", "report=true")
        assert code == 1
        out = capsys.readouterr()
        report = out.out + out.err
        halted = (
            f"pull-rollout of deployment '{name}' ({registered} v{bad}) halted: the health gate failed on {names[0]} "
        )
        assert halted + "in batch 1 of" in report and "failed its smoke test" in report, report
        assert client.get_model_version_by_alias(registered, "prod").version == v1  # moved back
        tag = RolloutTag.parse(client.get_model_version(registered, bad).tags[ROLLOUT_TAG])
        assert tag.state == HALTED and tag.from_version == v1
        for n in names:
            record = _record(devices[n], name)
            assert record["provenance"]["version"] == v1 and record["revision"] == 1  # nobody left it
        assert _device_record(client, registered, name, names[0])["version"] in (v1, bad)
        assert wait_for(lambda: _device_record(client, registered, name, names[0])["version"] == v1)
        for n in names[1:]:
            assert _device_record(client, registered, name, n) == {"version": v1, "state": "deployed", "revision": 1}
        desired = DesiredState(client).find(name)
        assert desired.status == HALTED and desired.version == bad and "health gate failed" in desired.reason
        capsys.readouterr()
        assert main(["fleet", "status", name, "--json"]) == 1
        (found,) = json.loads(capsys.readouterr().out)
        assert found["status"] == "halted" and found["staged"] is None  # (the tag is on bad, the alias on v1)
        assert f"alias prod moved to v{v1} (v{bad} halted)" in found["drift"]
        assert {(d["desired"], d["actual"], d["in_sync"]) for d in found["devices"]} == {(f"v{v1}", f"v{v1}", True)}
        client.set_model_version_tag(registered, bad, ROLLOUT_TAG, RolloutTag("prod", v1, 0.0).to_json())
        client.set_registered_model_alias(registered, "prod", bad)  # started again, nobody admitted yet
        assert main(["fleet", "sync", name]) == 1
        started = f"staged pull rollout of v{bad} (from v{v1}) in progress: wave 0, 0 of {DEVICES} devices admitted"
        assert f"sync of deployment '{name}': {started}" in capsys.readouterr().err
        assert DesiredState(client).find(name) == desired
    finally:
        client.delete_registered_model(registered)


@pytest.mark.slow
def test_a_halted_wave_moves_back_the_devices_that_took_the_version(
    tracking_server,
    pull_models,  # noqa: F811
    pull_fleet,
):
    """A canary wave of two where one device takes the version and the other refuses it (a size cap): the
    one that took it returns to the old version from its own disk; the later waves never left it."""
    dirs, _ = pull_models
    client, registered, name = _client(tracking_server), _unique("back"), _unique("det")
    v1, big = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["big"])
    client.set_registered_model_alias(registered, "prod", v1)
    names = _names(registered)
    devices = pull_fleet(registered, name, names, extra={names[1]: ["--max-upload-mb", "1"]})
    for device in devices.values():
        wait_for(lambda: _running(device, name) == v1)
    try:
        assert _rollout(name, registered, big, "--target", "@pullers", "-C", "canary=2") == 1
        took = _record(devices[names[0]], name)
        assert took["provenance"]["version"] == v1 and took["revision"] == 1  # its own previous version again
        assert took["previous"]["provenance"]["version"] == big
        assert _device_record(client, registered, name, names[0]) == {
            "version": v1,
            "state": "deployed",
            "revision": 1,
        }
        refused = _record(devices[names[1]], name)
        assert refused["provenance"]["version"] == v1 and refused["previous"] is None  # it never switched
        for n in names[2:]:
            assert _record(devices[n], name)["revision"] == 1 and _record(devices[n], name)["previous"] is None
        desired = DesiredState(client).find(name)
        assert desired.status == HALTED and desired.devices == {"rolled-back": 1, "failed": 1, "untouched": 2}
    finally:
        client.delete_registered_model(registered)


def test_a_device_waits_its_own_share_of_the_spread_window_and_a_stop_ends_thewait_for():
    stop = threading.Event()
    device = next(f"cam-{i}" for i in range(100) if 0.2 < spread_fraction(f"cam-{i}") < 0.8)
    start = time.monotonic()
    assert wait_spread(device, 1.0, stop)
    assert spread_fraction(device) - 0.01 <= time.monotonic() - start < spread_fraction(device) + 5
    assert wait_spread(device, 0.0, stop)  # no window: at once
    stop.set()
    start = time.monotonic()
    assert not wait_spread(device, 3600.0, stop) and time.monotonic() - start < 5


@pytest.mark.slow
def test_sync_and_status_leave_a_staged_rollout_to_pull_rollout_and_say_where_it_is(
    tracking_server,
    pull_models,  # noqa: F811
    pull_fleet,
    capsys,
):
    """A rollout held after its first wave (the tag written as the host writes it): `fleet sync` writes
    nothing and exits 1 naming it, `fleet status` compares each device with its own version under the
    tag; a halted tag keeps every device on `from`; `fleet pull-rollout` then starts it again and ends it."""
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    dirs, _ = pull_models
    client, registered, name = _client(tracking_server), _unique("held"), _unique("det")
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    client.set_registered_model_alias(registered, "prod", v1)
    names = _names(registered)
    devices = pull_fleet(registered, name, names)
    for device in devices.values():
        wait_for(lambda: _running(device, name) == v1)
    try:
        deploy = get_deploy_client("arachne-jetson://@pullers")
        deploy.create_deployment(name, f"models:/{registered}@prod", config={"report": "false"})
        recorded = DesiredState(client).find(name)
        assert (recorded.version, recorded.status) == (v1, ROLLED_OUT)
        positions = [position(registered, n) for n in names]
        held = RolloutTag("prod", v1, admit_after(positions, 0), wave=1).to_json()
        client.set_model_version_tag(registered, v2, ROLLOUT_TAG, held)
        client.set_registered_model_alias(registered, "prod", v2)
        wait_for(lambda: _running(devices[names[0]], name) == v2)
        assert all(_running(devices[n], name) == v1 for n in names[1:])
        capsys.readouterr()

        assert main(["fleet", "sync", name]) == 1
        rolling = f"staged pull rollout of v{v2} (from v{v1}) in progress: wave 1, 1 of {DEVICES} devices admitted"
        said = f"sync of deployment '{name}': {rolling}; `fleet pull-rollout` goes on with it"
        assert said in capsys.readouterr().err
        assert DesiredState(client).find(name) == recorded  # nothing written...
        tags = client.get_model_version(registered, v2).tags
        assert tags[ROLLOUT_TAG] == held and not any(t.startswith("arachne.devices.") for t in tags)  # ...anywhere
        with pytest.raises(MlflowException, match=re.escape(f"update of deployment '{name}': {rolling}")):
            deploy.update_deployment(name, f"models:/{registered}@prod", config={"report": "false"})
        assert DesiredState(client).find(name) == recorded
        assert all(_running(devices[n], name) == v1 for n in names[1:])

        assert main(["fleet", "status", name, "--json"]) == 1
        (found,) = json.loads(capsys.readouterr().out)
        assert found["status"] == "rolling" and found["reason"].startswith(rolling)
        assert (found["staged"]["wave"], found["staged"]["admitted"], found["staged"]["devices"]) == (1, 1, DEVICES)
        assert found["drift"] == [f"status rolling: {found['reason']}"]  # not the devices left on v1: their wave
        runs = {d["device"]: (d["desired"], d["actual"], d["in_sync"]) for d in found["devices"]}
        assert runs == {n: (f"v{v2}", f"v{v2}", True) if n == names[0] else (f"v{v1}", f"v{v1}", True) for n in names}

        client.set_model_version_tag(registered, v2, ROLLOUT_TAG, RolloutTag("prod", v1, 0.0, 1, HALTED).to_json())
        wait_for(lambda: _running(devices[names[0]], name) == v1)
        assert main(["fleet", "status", name, "--json"]) == 1
        (found,) = json.loads(capsys.readouterr().out)
        assert found["status"] == "halted"
        assert f"the tag keeps every device on v{v1}, though prod names v{v2}" in found["reason"]
        assert {(d["desired"], d["actual"], d["in_sync"]) for d in found["devices"]} == {(f"v{v1}", f"v{v1}", True)}
        assert main(["fleet", "sync", name]) == 1
        assert f"staged pull rollout of v{v2} (from v{v1}) halted" in capsys.readouterr().err
        assert DesiredState(client).find(name) == recorded

        assert _rollout(name, registered, v2) == 0  # from v1 again, to every device
        assert all(_running(devices[n], name) == v2 for n in names)
        assert ROLLOUT_TAG not in client.get_model_version(registered, v2).tags
        assert DesiredState(client).find(name).version == v2
        assert main(["fleet", "sync", name]) == 0 and main(["fleet", "status", name]) == 0
    finally:
        client.delete_registered_model(registered)
