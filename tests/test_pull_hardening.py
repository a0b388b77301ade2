"""Pull mode against a hostile tracking server (tests/helpers/hostile_registry.py), and the device-state contract.

Real device server processes follow the hostile server with `serve --follow` where the point is
what the device does; the time bounds are checked on a real `Follower` thread and `RegistryClient`
in this process, with its deadlines shortened.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.errors import RegistryUnavailableError
from arachne_mlflow.protocol import device_state
from arachne_mlflow.server.metrics import Metrics
from arachne_mlflow.server.pull.follow import Follower
from arachne_mlflow.server.pull.registry_client import ModelRef, RegistryClient
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.hostile_registry import HostileRegistry
from tests.helpers.servers import ServerProcess
from tests.helpers.waiting import wait_for

REGISTERED = "detector"
FOLLOW = f"det=models:/{REGISTERED}@prod"
NO_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


# -- the device-state contract ----------------------------------------------------------------------
def _entries(count: int) -> dict:
    at = "2026-12-01T10:00:00+00:00"
    return {f"cam-{i:04d}": device_state.entry("deployed", at, revision=3) for i in range(count)}


def test_a_version_tag_past_its_limit_is_summarized_failed_devices_first():
    entries = _entries(300)
    failed = device_state.entry("failed", "2026-12-02T00:00:00+00:00", error="smoke test: " + "x" * 500)
    assert len(failed["error"]) == device_state.MAX_ERROR_CHARS
    entries["cam-0299"] = failed
    text = device_state.fit_version_tag(entries, limit=5000)
    summarized = json.loads(text)
    assert len(text) <= 5000 and summarized[device_state.SUMMARY_KEY] == {"devices": 300, "deployed": 299, "failed": 1}
    assert summarized["cam-0299"] == failed and "cam-0000" in summarized and len(summarized) < 301


def test_a_tag_within_its_limit_stays_plain_and_unreadable_values_count_as_empty():
    entries = _entries(3)
    assert json.loads(device_state.fit_version_tag(entries)) == entries
    for bad in ("[1]", "not json", "[" * 100 + "]" * 100, "{}" * 100_000):
        assert device_state.parse_tag(bad) == {}
    with pytest.raises(ValueError):
        device_state.entry("installed", "t")


# -- a hostile tracking server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from arachne_mlflow.flavors import onnx as onnx_flavor

    directory = tmp_path_factory.mktemp("hostile") / "model"
    x = np.ones((1, 4), dtype=np.float32)
    onnx_flavor.save_model(
        models.onnx_linear("N"), str(directory), input_example=x, pip_requirements=["arachne-mlflow"]
    )
    return directory


@pytest.fixture
def hostile(model_dir):
    registry = HostileRegistry(REGISTERED, model_dir)
    yield registry
    registry.close()


@pytest.fixture
def device(tmp_path, hostile):
    """A device server process following the hostile registry every second."""
    env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS} | {"MLFLOW_TRACKING_URI": hostile.url}
    args = ["--follow", FOLLOW, "--follow-interval", "1", "--device-name", "cam-1", "--log-level", "info"]
    server = ServerProcess(tmp_path / "store", extra_args=args, env=env)
    yield server
    server.stop()


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _status(server) -> dict:
    return requests.get(f"{server.url}/v2/repository/models/det", timeout=10).json()


@pytest.mark.slow
def test_an_alias_answer_padded_with_empty_objects_costs_the_device_little_memory(hostile, device):
    hostile.mode = "pending"  # a small, valid answer: the baseline
    device.start()
    wait_for(lambda: hostile.count("/api/2.0/mlflow/registered-models/alias") >= 2)
    pid = device.process.pid
    peak_before = _proc_kib(pid, "VmHWM")
    hostile.mode = "padded"
    seen = hostile.count("/api/2.0/mlflow/registered-models/alias")
    wait_for(lambda: hostile.count("/api/2.0/mlflow/registered-models/alias") >= seen + 3)
    grown_mib = (_proc_kib(pid, "VmHWM") - peak_before) / 1024
    kept_mib = (_proc_kib(pid, "VmRSS") - peak_before) / 1024
    print(f"padded alias answer: device peak +{grown_mib:.1f} MiB, resident afterwards {kept_mib:+.1f} MiB")
    assert grown_mib < 64 and kept_mib < 48  # (the parsed answer cost +229 MiB per poll)
    assert "objects or arrays" in _status(device)["error"]
    assert hostile.count("/model-versions/get-artifact") == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("other-name", "not of the model asked for"),
        ("tags-int", "model_version.tags is not a list"),
        ("source-list", "'source' is a list, not a string"),
    ],
)
def test_a_wrong_answer_is_a_registry_error_that_installs_nothing(hostile, device, mode, words):
    hostile.mode = mode
    device.start()
    wait_for(lambda: hostile.count("/api/2.0/mlflow/registered-models/alias") >= 3)
    status = wait_for(lambda: words in (text := _status(device)["error"]) and text)
    assert "(error" in status, status
    assert hostile.count("/model-versions/get-artifact") == 0  # nothing downloaded, no smoke child
    for method, route in (("GET", "/v2/models/det"), ("GET", "/v2/models/det/ready"), ("POST", "/v2/models/det/infer")):
        answer = requests.request(method, device.url + route, json={"inputs": []}, timeout=10)
        error = answer.json()["error"]
        assert answer.status_code == 404 and "followed on this device and not installed yet" in error, error
        assert f"follows {FOLLOW.split('=', 1)[1]}" in error and words in error
    assert "Traceback" not in device.read_log()


@pytest.mark.slow
def test_the_device_installs_from_a_registry_that_answers_well(hostile, device):
    """The hostile server's good answers are what a follower takes (so the cases above fail for their reason)."""
    device.start()
    record = wait_for(lambda: (r := requests.get(f"{device.url}/v2/repository/models/det", timeout=10)).ok and r.json())
    assert record["provenance"]["version"] == "1" and record["provenance"]["registered_model"] == REGISTERED
    assert requests.get(f"{device.url}/v2/models/det/ready", timeout=10).status_code == 200


# -- time bounds, whatever the sender's pace -----------------------------------------------------------
def test_a_json_answer_trickling_a_byte_a_second_ends_at_its_deadline_and_at_stop(hostile):
    hostile.mode = "trickle"  # a ~130-byte answer over ~130 s
    client = RegistryClient(hostile.url)
    client.json_seconds = 2.0
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="ran out of time"):
        client.resolve(ModelRef(REGISTERED, alias="prod"))
    assert time.monotonic() - started < 8  # 2 s, and a wide margin for a busy machine

    client.json_seconds, client.stop = 600.0, threading.Event()
    threading.Timer(1.0, client.stop.set).start()
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="the server is stopping"):
        client.resolve(ModelRef(REGISTERED, alias="prod"))
    assert time.monotonic() - started < 6


def test_a_download_trickling_a_byte_every_half_second_ends_at_the_pull_deadline_and_at_stop(hostile, tmp_path):
    hostile.trickle_artifacts = True
    follower = Follower(
        "det", ModelRef(REGISTERED, alias="prod"), ModelStore(tmp_path / "store"), RegistryClient(hostile.url),
        Metrics(), interval=1.0, device="cam-1",
    )  # fmt: skip
    follower.pull_seconds = 3.0
    follower.start()
    try:
        wait_for(lambda: hostile.count("/model-versions/get-artifact") >= 1)
        started = time.monotonic()
        status = wait_for(lambda: "ran out of time" in ((s := follower.status())["last_error"] or "") and s, timeout=30)
        assert time.monotonic() - started < 10 and status["state"] == "error"  # 3 s, and a wide margin
        seen = hostile.count("/model-versions/get-artifact")
        wait_for(lambda: hostile.count("/model-versions/get-artifact") > seen, timeout=30)  # the next try trickles too
    finally:
        stopped = time.monotonic()
        follower.stop()
        follower.join(timeout=30)
    print(f"trickled download: the follower ended {time.monotonic() - stopped:.2f} s after stop")
    assert not follower._thread.is_alive() and time.monotonic() - stopped < 3  # (it read on for 28 s and more)
