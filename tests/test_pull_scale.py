"""Pull mode at scale: each device's state is its own record (a run in the fleet experiment), so
many devices converging at once lose nothing, a damaged record is repaired at the next check, and
the host reads the records in pages. The followers are real (`Follower` against a real `mlflow
server`, each with its own model store, installing through the smoke test); they run in one
process so that 25 of them fit on a small machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from arachne_mlflow.deployments import desired_state
from arachne_mlflow.deployments.desired_state import Desired, DesiredState
from arachne_mlflow.protocol import device_records
from arachne_mlflow.server.metrics import Metrics
from arachne_mlflow.server.pull.follow import Follower
from arachne_mlflow.server.pull.registry_client import ModelRef, RegistryClient
from arachne_mlflow.server.store import ModelStore
from tests.test_pull import _client, _register, _unique, pull_models  # noqa: F401 (a fixture)

DEVICES = 25


def _followers(tmp_path, url, registered):
    metrics = Metrics()
    return [
        Follower(
            "det",
            ModelRef(registered, alias="prod"),
            ModelStore(tmp_path / f"store-{i}"),
            RegistryClient(url),
            metrics,
            interval=60,
            device=f"cam-{i:02d}",
        )
        for i in range(DEVICES)
    ]


def _check_all(followers):
    with ThreadPoolExecutor(8) as pool:
        assert not any(pool.map(lambda f: f.check(), followers))  # (True: the registry could not be reached)


def _wrong(client, registered, followers, version):
    """The devices whose record does not say what their own store runs (`version`, deployed, its revision)."""
    records = DesiredState(client).device_records(Desired("det", registered, "models:/x@prod", "@all"))
    wrong = []
    for follower in followers:
        stored = follower.store.record("det")
        entry = records.get(follower.device) or {}
        said = (entry.get("version"), entry.get("state"), entry.get("revision"))
        if stored["provenance"]["version"] != version or said != (version, "deployed", stored["revision"]):
            wrong.append((follower.device, said))
    return wrong


@pytest.mark.slow
def test_25_followers_converge_with_every_record_right_and_a_damaged_record_is_repaired(
    mlflow_server,
    pull_models,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    dirs, _ = pull_models
    client, registered = _client(mlflow_server), _unique("scale")
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    monkeypatch.setattr(desired_state, "_SEARCH_PAGE", 10)  # the host reads the 25 records in 3 pages
    client.set_registered_model_alias(registered, "prod", v1)
    followers = _followers(tmp_path, mlflow_server, registered)
    _check_all(followers)
    assert _wrong(client, registered, followers, v1) == []
    client.set_registered_model_alias(registered, "prod", v2)  # every device pulls at once
    _check_all(followers)
    assert _wrong(client, registered, followers, v2) == []
    assert all(f.status()["state"] == "following" for f in followers)
    assert client.get_model_version(registered, v1).tags == {} == client.get_model_version(registered, v2).tags

    runs = {f.device: f._record._run_id for f in followers}
    client.set_tag(runs["cam-00"], device_records.ENTRY, '{"version": "' + v1 + '", "state": "pulling"}')
    client.set_tag(runs["cam-01"], device_records.ENTRY, "not json")
    client.set_tag(runs["cam-02"], device_records.STATE, "failed")
    client.delete_run(runs["cam-03"])
    assert len(_wrong(client, registered, followers, v2)) == 3  # (cam-02's entry still reads right)
    _check_all(followers)  # the next check of each
    assert _wrong(client, registered, followers, v2) == []
    assert client.get_run(runs["cam-02"]).data.tags[device_records.STATE] == "deployed"
    assert {f.device: f._record._run_id for f in followers if f.device != "cam-03"} == {
        d: r for d, r in runs.items() if d != "cam-03"
    }  # each device kept its own run (a deleted one is made again)
