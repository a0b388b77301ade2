"""Captured samples into MLflow and back: real `mlflow server` processes, real device servers.

A pulling device uploads its closed segments over REST (never MLflow) to the capture experiment; the
host drains pushed devices with `capture pull`; `load_samples` reads them back. Segments are written
here with the capture format's own encoder, as a device's capture writer writes them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.capture import load_samples
from arachne_mlflow.capture.runs import CaptureRuns
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import capture_runs
from arachne_mlflow.protocol.capture_format import Sample, closed_segments, encode_sample, iter_samples, segment_name
from arachne_mlflow.server.capture.manager import CAPTURE_DIR
from arachne_mlflow.server.pull.capture_upload import CaptureUploader, UploadSettings
from arachne_mlflow.server.pull.registry_client import RegistryClient
from arachne_mlflow.server.pull.throttle import TokenBucket
from arachne_mlflow.server.store import ModelStore
from tests.helpers.mlflow_server import ADMIN, MlflowServer
from tests.helpers.servers import ServerProcess
from tests.helpers.waiting import wait_for
from tests.test_pull import _register as register_version
from tests.test_pull import pull_models  # noqa: F401 (a fixture)

NO_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
DAY = 86400.0
CAPTURE_USER, OTHER_USER = ("capture-device", "capture-password-123"), ("other-user", "other-password-123")
T0 = 1_780_000_000.0  # a fixed UTC moment (2026-05-28), so days and ranges are the same on every run


def _sample(device: str, timestamp: float, value: float, version: str = "1", model: str = "det") -> Sample:
    x = np.full((1, 4), value, dtype=np.float32)
    return Sample(
        model, version, device, timestamp, {"x": x, "tag": np.array([[f"s{value}"]], dtype=object)}, {"y": x * 2}
    )


def _write_spool(spool: Path, device: str, counts: list[int], start: float, first_value: float = 0.0) -> list[Sample]:
    """Segments 1..n with `counts[i]` samples each (the last one is the open segment); the samples written."""
    spool.mkdir(parents=True, exist_ok=True)
    written, value = [], first_value
    for sequence, count in enumerate(counts, start=1):
        with open(spool / segment_name(sequence), "wb") as file:
            for _ in range(count):
                sample = _sample(device, start + value, value)
                file.write(encode_sample(sample))
                written.append(sample)
                value += 1
    return written


def _key(sample: Sample) -> tuple:
    """A sample's content, to count each one (nothing lost, nothing twice)."""
    return (sample.device, sample.timestamp, sample.inputs["x"].tobytes(), sample.outputs["y"].tobytes())


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(url)


def _environment(tracking_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS}
    return {**environment, "MLFLOW_TRACKING_URI": tracking_url, **(extra or {})}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- a pulling device -----------------------------------------------------------------------------
def test_an_offline_device_keeps_its_spool_and_delivers_it_once_when_the_server_is_back(tmp_path):
    tracking = MlflowServer(tmp_path / "mlflow")  # (not started yet: the device starts offline)
    registered, device_name = _unique("detector"), _unique("cam")
    store = tmp_path / "store"
    spool = store / CAPTURE_DIR / "det"
    env = _environment(tracking.url, {"ARACHNE_CAPTURE_MAX_BPS": "200000"})
    args = ["--follow", f"det=models:/{registered}@prod", "--follow-interval", "0.5", "--device-name", device_name]
    device = ServerProcess(store, extra_args=args, env=env).start()
    written = _write_spool(spool, device_name, [3, 4, 2, 5], T0)  # (as the device's capture writer would)
    closed = written[: 3 + 4 + 2]  # the newest segment is open: it stays
    try:
        time.sleep(3)  # several checks, every one against a stopped tracking server
        assert sorted(p.name for p in spool.iterdir()) == [segment_name(n) for n in (1, 2, 3, 4)]
        tracking.start()
        wait_for(lambda: sorted(p.name for p in spool.iterdir()) == [segment_name(4)], timeout=180)
    finally:
        device.stop()
        tracking_client = _client(tracking.url)
        delivered = load_samples(registered, as_="samples", client=tracking_client)
        arrays = load_samples(registered, devices=[device_name], client=tracking_client)
        tracking.stop()
    assert Counter(map(_key, delivered)) == Counter(map(_key, closed))  # every closed sample exactly once
    np.testing.assert_array_equal(arrays.inputs["x"], np.concatenate([s.inputs["x"] for s in closed]))
    assert arrays.inputs["tag"].ravel().tolist() == [f"s{float(v)}" for v in range(9)]
    np.testing.assert_array_equal(arrays.outputs["y"], np.concatenate([s.outputs["y"] for s in closed]))
    assert set(arrays.versions) == {capture_runs.UNKNOWN}  # (the device stores no model det: no provenance)


def test_a_pulling_device_captures_what_it_serves_offline_and_delivers_it_once_when_back(
    tmp_path,
    pull_models,  # noqa: F811
):
    """End to end: real requests to a following device, captured while the tracking server is down,
    delivered once it is back, loaded as the arrays that were sent, under the device's name and version."""
    dirs, _ = pull_models
    tracking = MlflowServer(tmp_path / "mlflow").start()
    client, registered, device_name = _client(tracking.url), _unique("detector"), _unique("cam")
    version = register_version(client, registered, dirs["v1"])
    client.set_registered_model_alias(registered, "prod", version)
    store = tmp_path / "store"
    args = ["--follow", f"det=models:/{registered}@prod", "--follow-interval", "0.5", "--device-name", device_name]
    device = ServerProcess(store, extra_args=args, env=_environment(tracking.url)).start()
    spool, sent = store / CAPTURE_DIR / "det", []
    try:
        wait_for(lambda: requests.get(f"{device.url}/v2/models/det/ready", timeout=10).status_code == 200, 180)
        put = requests.put(f"{device.url}/v2/repository/models/det/capture", json={"rate": 1.0}, timeout=30)
        assert put.status_code == 200, put.text
        tracking.stop()  # the device is offline from here on
        for i in range(12):
            x = np.full((2, 4), float(i), np.float32)
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]}
            assert requests.post(f"{device.url}/v2/models/det/infer", json=body, timeout=30).status_code == 200
            sent.append(x)
        assert requests.post(f"{device.url}/v2/capture/det/rollover", timeout=30).json()["closed"]
        time.sleep(2)  # several checks against the stopped tracking server: the spool stays
        assert closed_segments(spool)
        tracking.start()
        wait_for(lambda: not closed_segments(spool), timeout=180)
        arrays = load_samples(registered, devices=[device_name], client=client)
    finally:
        device.stop()
        client.delete_registered_model(registered)
        tracking.stop()
    assert len(arrays) == 12 and set(arrays.versions) == {version} and set(arrays.devices) == {device_name}
    np.testing.assert_array_equal(arrays.inputs["x"], np.concatenate(sent))


def test_an_upload_cut_mid_way_is_sent_again_and_stored_once(tmp_path, mlflow_server):
    registered, device_name = _unique("detector"), _unique("cam")
    store = ModelStore(tmp_path / "store")  # (an empty model store: the uploader reads its records)
    spool = store.root / CAPTURE_DIR / "det"
    written = _write_spool(spool, device_name, [40, 1], T0)  # one closed segment of a few KB, then the open one
    segment = spool / segment_name(1)
    size = segment.stat().st_size
    stop = threading.Event()
    registry = RegistryClient(mlflow_server)
    registry.stop = stop  # (the follower's stop: it cuts the request in progress, like a dropped link)
    slow = CaptureUploader("det", registered, store, registry, tmp_path, settings=UploadSettings(max_bps=size / 4))
    threading.Timer(1.0, stop.set).start()  # about a quarter of the body has gone
    started = time.monotonic()
    assert slow.deliver() is True  # unreachable: try again later
    assert time.monotonic() - started < 30 and segment.is_file()

    fast = CaptureUploader("det", registered, store, RegistryClient(mlflow_server), tmp_path, settings=UploadSettings())
    copy = tmp_path / "copy.cap"
    shutil.copyfile(segment, copy)
    assert fast.deliver() is False and not segment.exists()
    shutil.copyfile(copy, segment)  # the confirmation was lost: the device sends the same segment again
    assert fast.deliver() is False and not segment.exists()

    client = _client(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name(capture_runs.EXPERIMENT).experiment_id],
        capture_runs.search_filter({capture_runs.REGISTERED_MODEL: registered}),
    )
    assert len(runs) == 1 and runs[0].data.tags[capture_runs.DAY] == capture_runs.day_of(T0)
    stored = client.list_artifacts(runs[0].info.run_id, "samples/det")
    assert [(Path(f.path).name, f.file_size) for f in stored] == [(segment_name(1), size)]
    delivered = load_samples(registered, as_="samples", client=client)
    assert Counter(map(_key, delivered)) == Counter(map(_key, written[:40]))


def test_the_bandwidth_cap_paces_an_upload(tmp_path, mlflow_server):
    store = ModelStore(tmp_path / "store")
    spool = store.root / CAPTURE_DIR / "det"
    _write_spool(spool, _unique("cam"), [60, 1], T0)
    size = (spool / segment_name(1)).stat().st_size
    registry, settings = RegistryClient(mlflow_server), UploadSettings(max_bps=size / 2)
    uploader = CaptureUploader("det", _unique("detector"), store, registry, tmp_path, None, settings)
    uploader._run_of(segment_name(1), list(iter_samples(spool / segment_name(1))))  # (the run first: not timed)
    started = time.monotonic()
    assert uploader.deliver() is False
    assert time.monotonic() - started >= 1.5  # two seconds' worth at the cap, less the first burst
    bucket = TokenBucket(1000)
    assert bucket.burst == 100 and bucket.take(10**6) <= 100
    with pytest.raises(InvalidInputError):
        TokenBucket(0)


# -- the host --------------------------------------------------------------------------------------
def test_capture_pull_drains_a_pushed_device_into_the_same_runs(tmp_path, mlflow_server):
    token, device_name, registered = "capture-token-123", _unique("cam"), _unique("detector")
    store = tmp_path / "store"
    device = ServerProcess(store, token=token).start()
    try:
        written = _write_spool(store / CAPTURE_DIR / "det", device_name, [2, 3, 4], T0)
        env = _environment(mlflow_server, {"ARACHNE_TOKEN": "wrong-token"})
        command = [sys.executable, "-m", "arachne_mlflow.cli", "capture", "pull", "-t", device.url.split("//")[1]]
        command += ["-m", "det", "--registered-model", registered, "--max-bps", "1000000"]
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "401" in refused.stdout
        env["ARACHNE_TOKEN"] = token
        drained = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert sorted(p.name for p in (store / CAPTURE_DIR / "det").glob("seg-*")) == [segment_name(3)]
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and " 0 " in again.stdout.splitlines()[1]  # nothing left to send
    finally:
        device.stop()
    delivered = load_samples(registered, as_="samples", client=_client(mlflow_server))
    assert Counter(map(_key, delivered)) == Counter(map(_key, written[:5]))


def test_load_samples_returns_arrays_equal_to_what_was_sent_filtered_by_device_time_and_version(
    tmp_path, mlflow_server, tracking_server
):
    client = _client(mlflow_server)
    registered = _unique("detector")
    runs = CaptureRuns(client)
    sent = []
    for device, start in (("cam-a", T0), ("cam-b", T0 + DAY)):  # two devices, two days
        spool = tmp_path / device
        sent += _write_spool(spool, device, [5, 5, 1], start, first_value=len(sent))
        for sequence in (1, 2):
            segment = spool / segment_name(sequence)
            samples = list(iter_samples(segment))
            runs.store(runs.run_for(samples, {"1": (registered, "7")}, registered), "det", segment)
    sent = [s for s in sent if s.timestamp not in (T0 + 10, T0 + DAY + 21)]  # (the open segments' samples)

    everything = load_samples(f"{registered}", client=client)
    assert len(everything) == 20 and list(everything.devices) == ["cam-a"] * 10 + ["cam-b"] * 10
    np.testing.assert_array_equal(everything.inputs["x"], np.concatenate([s.inputs["x"] for s in sent]))
    np.testing.assert_array_equal(everything.timestamps, [s.timestamp for s in sent])

    only_b = load_samples(registered, devices=["cam-b"], client=client)
    assert set(only_b.devices) == {"cam-b"} and len(only_b) == 10
    window = load_samples(registered, since=T0 + 3, until=T0 + DAY + 13, client=client)
    assert window.timestamps.tolist() == [s.timestamp for s in sent if T0 + 3 <= s.timestamp < T0 + DAY + 13]
    assert len(load_samples(f"models:/{registered}/7", client=client)) == 20  # (revision 1 served version 7)
    assert len(load_samples(registered, 8, client=client)) == 0

    frame = load_samples(registered, devices=["cam-a"], as_="pandas", client=client)
    assert list(frame.columns) == ["x", "tag", "output.y", "timestamp", "device", "version"] and len(frame) == 10
    np.testing.assert_array_equal(np.stack(frame["x"].to_list()), np.concatenate([s.inputs["x"] for s in sent[:10]]))
    assert str(frame["timestamp"].dt.tz) == "UTC"

    import mlflow  # the frame as mlflow.models.evaluate takes it: one row per sample, arrays in cells

    frame["label"] = [float(y[0]) for y in frame["output.y"]]
    with mlflow.start_run():
        result = mlflow.models.evaluate(
            model=lambda rows: np.array([2.0 * x[0] for x in rows["x"]]),
            data=frame[["x", "label"]],
            targets="label",
            model_type="regressor",
        )
    assert result.metrics["example_count"] == 10 and result.metrics["max_error"] == 0.0


# -- least privilege ---------------------------------------------------------------------------------
def test_a_device_user_with_edit_on_the_capture_experiment_only_delivers_and_one_without_keeps_its_spool(
    tmp_path, caplog
):
    server = MlflowServer(tmp_path / "mlflow", basic_auth=True).start()
    try:
        admin = requests.Session()
        admin.auth = ADMIN
        answer = admin.post(f"{server.url}/api/2.0/mlflow/experiments/create", json={"name": capture_runs.EXPERIMENT})
        experiment = answer.json()["experiment_id"]
        for user in (CAPTURE_USER, OTHER_USER):
            body = {"username": user[0], "password": user[1]}
            assert admin.post(f"{server.url}/api/2.0/mlflow/users/create", json=body).status_code == 200
        grant = {"username": CAPTURE_USER[0], "resource_type": "experiment", "resource_id": experiment}
        answer = admin.post(f"{server.url}/api/3.0/mlflow/users/permissions/grant", json=grant | {"permission": "EDIT"})
        assert answer.status_code == 200, answer.text

        store = ModelStore(tmp_path / "store")
        spool = store.root / CAPTURE_DIR / "det"
        written = _write_spool(spool, _unique("cam"), [3, 1], T0)
        registered = _unique("detector")

        def uploader(user):
            registry = RegistryClient.from_env(
                {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": user[0]}
                | {"MLFLOW_TRACKING_PASSWORD": user[1]}
            )
            return CaptureUploader("det", registered, store, registry, tmp_path, settings=UploadSettings())

        with caplog.at_level(logging.WARNING):
            assert uploader(OTHER_USER).deliver() is False  # nothing written, nothing deleted
        assert "403" in caplog.text and "stays in the spool" in caplog.text
        assert (spool / segment_name(1)).is_file()
        assert uploader(CAPTURE_USER).deliver() is False and not (spool / segment_name(1)).exists()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
            patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
            delivered = load_samples(registered, as_="samples", client=_client(server.url))
        assert Counter(map(_key, delivered)) == Counter(map(_key, written[:3]))
        models = requests.get(f"{server.url}/api/2.0/mlflow/registered-models/search", auth=CAPTURE_USER, timeout=30)
        assert models.status_code == 200 and not models.json().get("registered_models")  # (it sees no model)
    finally:
        server.stop()


# -- memory ------------------------------------------------------------------------------------------
def _big_spool(spool: Path, device: str, megabytes: int) -> int:
    """One closed segment of about `megabytes` MB of MobileNet-sized samples (then the open one); its count."""
    spool.mkdir(parents=True, exist_ok=True)
    x, y = np.zeros((1, 224, 224, 3), np.float32), np.zeros((1, 1000), np.float32)
    count = megabytes * 1024**2 // (x.nbytes + y.nbytes)
    with open(spool / segment_name(1), "wb") as file:
        for i in range(count):
            x[0, 0, 0, 0] = i
            file.write(encode_sample(Sample("det", "1", device, T0 + i, {"x": x}, {"y": y})))
    (spool / segment_name(2)).write_bytes(b"")
    return count


def _traced_peak(call) -> int:
    """The most memory Python and numpy held at once during `call()`, above what they held before."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_delivery_streams_a_segment_and_never_holds_it_in_memory(tmp_path, mlflow_server):
    """A 64 MB segment goes from a pulling device, and a 32 MB one from a pushed device through the host,
    while the process holds at most a quarter of it at once (the samples and the body are read piecewise)."""
    store = ModelStore(tmp_path / "store")
    spool = store.root / CAPTURE_DIR / "det"
    count = _big_spool(spool, _unique("cam"), 64)
    size = (spool / segment_name(1)).stat().st_size
    uploader = CaptureUploader("det", _unique("detector"), store, RegistryClient(mlflow_server), tmp_path)
    peak = _traced_peak(lambda: uploader.deliver())
    assert not (spool / segment_name(1)).exists() and peak < size / 4, f"{peak} bytes held for a {size}-byte segment"

    from arachne_mlflow.capture.pull import pull

    device = ServerProcess(tmp_path / "pushed").start()
    try:
        pushed = _big_spool(tmp_path / "pushed" / CAPTURE_DIR / "det", _unique("cam"), 32)
        size = (tmp_path / "pushed" / CAPTURE_DIR / "det" / segment_name(1)).stat().st_size
        results = []
        client = _client(mlflow_server)
        target = device.url.split("//")[1]
        peak = _traced_peak(lambda: results.extend(pull(target, ["det"], registered_model="d", client=client)))
    finally:
        device.stop()
    assert results[0].error is None and (results[0].segments, results[0].samples) == (1, pushed) and count
    assert peak < size / 4, f"{peak} bytes held for a {size}-byte segment"


def test_a_segments_summary_names_the_same_run_as_its_samples(tmp_path):
    """The summary keeps the first sample and the first of each other revision, without tensors."""
    path = tmp_path / segment_name(1)
    samples = [_sample("cam", T0 + i, float(i), version=str(1 + i // 3)) for i in range(7)]  # revisions 1, 2, 3
    path.write_bytes(b"".join(map(encode_sample, samples)) + b"ACP1torn")
    summary = capture_runs.summarize_segment(path)
    assert summary.count == 7 and [s.revision for s in summary.heads] == ["1", "2", "3"]
    assert all(not s.inputs and not s.outputs for s in summary.heads) and summary.heads[0].timestamp == T0
    origin = {"1": ("det-model", "4"), "2": ("det-model", "5"), "3": ("other", "9")}
    assert capture_runs.segment_tags(summary.heads, origin, "x") == capture_runs.segment_tags(samples, origin, "x")
