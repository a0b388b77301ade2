"""Field capture on the device: rules, sampling, caps, the disk budget, crash safety, routes behind the token."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import threading
import time

import numpy as np
import pytest
import requests
import yaml

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.capture_rules import CaptureRules, parse_rules
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.protocol import capture_format
from arachne_mlflow.protocol.capture_format import closed_segments, iter_samples
from arachne_mlflow.server.capture import Capture
from arachne_mlflow.server.capture.sampler import CAPPED, KEPT, SKIPPED, Sampler
from arachne_mlflow.server.capture.writer import SampleQueue
from tests.helpers.servers import ServerProcess, ThreadServer

TOKEN = "capture-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _with_capture(source, directory, rules):
    """A copy of model dir `source` whose MLmodel carries `rules` (None: no capture block)."""
    shutil.copytree(source, directory)
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    if rules is not None:
        mlmodel["flavors"]["arachne"]["capture"] = rules
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


def _metric(text, name, **labels):
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _samples(spool_dir):
    return [sample for path in capture_format.segments(spool_dir) for sample in iter_samples(path)]


# -- rules ------------------------------------------------------------------------------------


def test_rules_parse_with_defaults_and_round_trip():
    assert parse_rules(None) is None and parse_rules({}) is None
    rules = parse_rules({"rate": 0.25, "per_hour": 10, "output": "y", "max_score": [0.2, 0.6], "classes": [3, 1]})
    assert rules == CaptureRules(rate=0.25, per_hour=10, output="y", max_score=(0.2, 0.6), classes=frozenset({1, 3}))
    assert rules.keep_outputs is True and rules.budget_bytes == 256 * 1024 * 1024
    assert parse_rules(rules.to_dict()) == rules


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"rate": 0.1, "rte": 1}, "unknown keys \\['rte'\\]"),
        ({"per_hour": 3}, "'rate' is required"),
        ({"rate": 1.5}, "'rate' must be in"),
        ({"rate": True}, "'rate' must be a number"),
        ({"rate": float("nan")}, "'rate' must be a number"),
        ({"rate": 1, "per_minute": -1}, "'per_minute' must be a whole number"),
        ({"rate": 1, "per_day": 2.5}, "'per_day' must be a whole number"),
        ({"rate": 1, "classes": [1]}, "name it in 'output'"),
        ({"rate": 1, "output": "y", "max_score": [0.9, 0.1]}, "low end above"),
        ({"rate": 1, "output": "y", "max_score": [0.1]}, "band"),
        ({"rate": 1, "output": "y", "classes": [-1]}, "class indices"),
        ({"rate": 1, "keep_outputs": "yes"}, "true or false"),
        ({"rate": 1, "budget_mb": 0}, "'budget_mb' must be in"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(data, words):
    with pytest.raises(InvalidInputError, match=words):
        parse_rules(data, "the rules")


def test_mlmodel_capture_block_is_read_and_checked(onnx_linear_model, tmp_path):
    good = _with_capture(onnx_linear_model, tmp_path / "good", {"rate": 0.5, "per_day": 7})
    assert read_model_dir(good).capture == CaptureRules(rate=0.5, per_day=7)
    assert read_model_dir(onnx_linear_model).capture is None
    bad = _with_capture(onnx_linear_model, tmp_path / "bad", {"rate": 2})
    with pytest.raises(InvalidInputError, match="arachne.capture"):
        read_model_dir(bad)


# -- sampling ---------------------------------------------------------------------------------


def test_rate_sampling_is_repeatable_with_a_seed():
    rules = CaptureRules(rate=0.3)

    def draws(seed):
        sampler = Sampler(seed)
        return [sampler.decide(rules, {}, 0.0) for _ in range(1000)]

    first = draws(7)
    assert first == draws(7)
    assert 200 < first.count(KEPT) < 400 and set(first) == {KEPT, SKIPPED}
    assert {Sampler(1).decide(CaptureRules(rate=0.0), {}, 0.0) for _ in range(200)} == {SKIPPED}
    assert {Sampler(1).decide(CaptureRules(rate=1.0), {}, 0.0) for _ in range(200)} == {KEPT}


def test_output_conditions_read_each_row():
    scores = {"p": np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)}
    sampler = Sampler(0)

    def verdict(**conditions):
        return sampler.decide(CaptureRules(rate=1.0, output="p", **conditions), scores, 0.0)

    assert verdict(classes=frozenset({1})) == KEPT  # row 0's top class
    assert verdict(classes=frozenset({2})) == SKIPPED
    assert verdict(max_score=(0.4, 0.6)) == KEPT  # row 1's top score
    assert verdict(max_score=(0.4, 0.6), classes=frozenset({1})) == SKIPPED  # no single row meets both
    assert verdict(max_score=(0.4, 0.6), classes=frozenset({0})) == KEPT
    assert sampler.decide(CaptureRules(rate=1.0, output="missing", classes=frozenset({0})), scores, 0.0) == SKIPPED
    text = {"p": np.array(["a", "b"], dtype=object)}
    assert sampler.decide(CaptureRules(rate=1.0, output="p", classes=frozenset({0})), text, 0.0) == SKIPPED


def test_caps_count_per_window():
    rules = CaptureRules(rate=1.0, per_minute=2, per_hour=3)
    sampler = Sampler(0)
    minute = [sampler.decide(rules, {}, 120.0 + i) for i in range(4)]
    assert minute == [KEPT, KEPT, CAPPED, CAPPED]
    assert sampler.decide(rules, {}, 185.0) == KEPT  # a new minute, the hour's third
    assert sampler.decide(rules, {}, 250.0) == CAPPED  # the hour's cap is spent
    assert sampler.decide(rules, {}, 3600.0) == KEPT  # a new hour


# -- the spool --------------------------------------------------------------------------------


def _capture(root, **options):
    return Capture(root, lambda name: None, lambda name: None, device="test-device", seed=0, **options)


def test_the_budget_deletes_the_oldest_segments_and_counts_their_samples(tmp_path):
    capture = _capture(tmp_path)
    rules = CaptureRules(rate=1.0, budget_mb=0.25)  # 256 KiB; segments roll at 64 KiB
    tensors = {"x": np.zeros(20_000 // 4, np.float32)}
    try:
        for i in range(60):
            capture.offer("m", "1", rules, {"x": tensors["x"] + i}, {})
            _wait_for(lambda: sum(capture.counts.captured.values()) == i + 1)
    finally:
        capture.close()
    spool_dir = tmp_path / ".capture" / "m"
    kept = _samples(spool_dir)
    total = sum(path.stat().st_size for path in capture_format.segments(spool_dir))
    assert total <= rules.budget_bytes
    assert capture_format.segment_sequence(capture_format.segments(spool_dir)[0].name) > 1
    dropped = capture.counts.dropped[("m", "budget")]
    assert dropped == 60 - len(kept) > 0
    assert [int(sample.inputs["x"][0]) for sample in kept] == list(range(dropped, 60))  # the newest survive


def test_a_sample_larger_than_the_budget_is_dropped(tmp_path):
    capture = _capture(tmp_path)
    try:
        capture.offer("m", "1", CaptureRules(rate=1.0, budget_mb=0.01), {"x": np.zeros(10_000, np.float32)}, {})
        _wait_for(lambda: capture.counts.dropped.get(("m", "budget")) == 1)
    finally:
        capture.close()
    assert _samples(tmp_path / ".capture" / "m") == []


def test_a_full_queue_drops_and_never_waits_for_the_disk(tmp_path):
    capture = _capture(tmp_path, queue=SampleQueue(max_items=2))
    rules = CaptureRules(rate=1.0)
    spool = capture.spool("m")
    slowest = 0.0
    with spool.lock:  # the writer is stuck on the disk (it waits for this lock to append)
        for i in range(50):
            started = time.perf_counter()
            capture.offer("m", "1", rules, {"x": np.full(4, i, np.float32)}, {})
            slowest = max(slowest, time.perf_counter() - started)
    capture.close()
    assert slowest < 0.5  # (a busy machine's margin: each offer is a few list operations)
    queue_full = capture.counts.dropped[("m", "queue_full")]
    assert 45 <= queue_full <= 47 and capture.counts.captured["m"] == 50 - queue_full


def test_kept_samples_do_not_share_buffers_someone_may_write_again(tmp_path):
    capture = _capture(tmp_path)
    region = bytearray(np.arange(4, dtype=np.float32).tobytes())  # (as a shared-memory region would be)
    view = np.frombuffer(region, np.float32)
    body = np.frombuffer(np.ones(4, np.float32).tobytes(), np.float32)  # a view of an immutable request body
    capture.offer("m", "1", CaptureRules(rate=1.0), {"region": view, "body": body}, {})
    region[:] = b"\0" * len(region)
    capture.close()
    (sample,) = _samples(tmp_path / ".capture" / "m")
    assert sample.inputs["region"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sample.inputs["body"].tolist() == [1.0] * 4


# -- a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captured_server(tmp_path_factory, onnx_linear_model):
    """A server with `tagged` (capture in its MLmodel), `plain` and `off` (none), behind a token."""
    root = tmp_path_factory.mktemp("capture-server")
    tagged = _with_capture(onnx_linear_model, root / "tagged", {"rate": 1.0, "keep_outputs": False})
    server = ThreadServer(root / "store", token=TOKEN, grpc=False).start()
    server.deploy({"tagged": tagged, "plain": onnx_linear_model, "off": onnx_linear_model})
    yield server
    server.stop()


def _infer(server, name, values):
    with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
        for value in values:
            device.infer(name, [np.full((1, 4), value, np.float32)])


def _drain(server, name):
    """Every sample of `name` written so far (rolls the open segment over through the route)."""
    counts = server.dataplane.capture.counts
    _wait_for(lambda: len(server.dataplane.capture.queue) == 0)
    before = counts.captured.get(name, 0)
    assert requests.post(f"{server.url}/v2/capture/{name}/rollover", headers=AUTH, timeout=10).status_code == 200
    assert counts.captured.get(name, 0) == before
    return [sample for path in closed_segments(server.store / ".capture" / name) for sample in iter_samples(path)]


def test_capture_off_writes_nothing(captured_server):
    _infer(captured_server, "off", range(20))
    assert not (captured_server.store / ".capture" / "off").exists()
    rules = requests.get(f"{captured_server.url}/v2/repository/models/off/capture", headers=AUTH, timeout=10)
    assert rules.json() == {"model": "off", "source": "none", "rules": None}
    listing = requests.get(f"{captured_server.url}/v2/capture/off/segments", headers=AUTH, timeout=10)
    assert listing.json() == {"model": "off", "segments": []}
    assert "off" not in captured_server.dataplane.capture.counts.captured


def test_mlmodel_rules_capture_every_request_into_a_private_spool(captured_server):
    _infer(captured_server, "tagged", range(5))
    samples = _drain(captured_server, "tagged")
    assert [sample.inputs["x"].tolist() for sample in samples[-5:]] == [[[float(i)] * 4] for i in range(5)]
    assert all(sample.outputs == {} and sample.revision == "1" for sample in samples)  # keep_outputs: false
    spool_dir = captured_server.store / ".capture" / "tagged"
    for path in (captured_server.store / ".capture", spool_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in spool_dir.iterdir()} == {0o600}
    metrics = requests.get(f"{captured_server.url}/metrics", headers=AUTH, timeout=10).text
    assert _metric(metrics, "arachne_capture_captured_total", model="tagged") >= 5


def test_device_rules_with_an_output_condition_and_a_cap(captured_server):
    url = f"{captured_server.url}/v2/repository/models/plain/capture"
    rules = {"rate": 1.0, "output": "y", "classes": [1], "per_day": 3}
    answer = requests.put(url, json=rules, headers=AUTH, timeout=10)
    assert answer.status_code == 200 and answer.json()["source"] == "device"
    day = int(time.time() // 86400)
    _infer(captured_server, "plain", [0, 0, 1, 0, 2, 3, 4, 5])  # x=0 answers class 0; x>=1 class 1
    samples = _drain(captured_server, "plain")
    kept = [float(s.inputs["x"][0, 0]) for s in samples]
    if int(time.time() // 86400) == day:  # (a new day restarts the cap: then up to 5 are kept)
        assert kept == [1.0, 2.0, 3.0]
    assert kept == [1.0, 2.0, 3.0, 4.0, 5.0][: len(kept)] and all(s.outputs["y"].argmax() == 1 for s in samples)
    counts = captured_server.dataplane.capture.counts
    assert counts.dropped[("plain", "cap")] == 5 - len(samples)
    assert (captured_server.store / ".capture" / "plain" / "rules.json").is_file()
    cleared = requests.delete(url, headers=AUTH, timeout=10).json()
    assert cleared == {"model": "plain", "source": "none", "rules": None}


def test_segment_routes_list_download_and_delete(captured_server):
    base = f"{captured_server.url}/v2/capture/tagged"
    _infer(captured_server, "tagged", range(3))
    _drain(captured_server, "tagged")
    listing = requests.get(base + "/segments", headers=AUTH, timeout=10).json()["segments"]
    assert listing and all(capture_format.SEGMENT_PATTERN.fullmatch(entry["name"]) for entry in listing)
    name = listing[0]["name"]
    body = requests.get(f"{base}/segments/{name}", headers=AUTH, timeout=10)
    assert body.status_code == 200 and body.content == (captured_server.store / ".capture/tagged" / name).read_bytes()
    assert requests.delete(f"{base}/segments/{name}", headers=AUTH, timeout=10).status_code == 200
    assert requests.get(f"{base}/segments/{name}", headers=AUTH, timeout=10).status_code == 404
    open_segment = capture_format.segments(captured_server.store / ".capture/tagged")[-1].name
    assert requests.get(f"{base}/segments/{open_segment}", headers=AUTH, timeout=10).status_code == 409
    for bad in ("seg-1.cap", "seg-000000000001.cap.tmp", "..%2Frules.json", "rules.json", "%2e%2e"):
        status = requests.get(f"{base}/segments/{bad}", headers=AUTH, timeout=10).status_code
        assert status in (400, 404), bad
    assert requests.get(
        f"{captured_server.url}/v2/capture/..%2F..%2Fx/segments", headers=AUTH, timeout=10
    ).status_code in (
        400,
        404,
    )


def test_capture_routes_need_the_token(captured_server):
    routes = [
        ("GET", "/v2/repository/models/tagged/capture"),
        ("PUT", "/v2/repository/models/tagged/capture"),
        ("DELETE", "/v2/repository/models/tagged/capture"),
        ("GET", "/v2/capture/tagged/segments"),
        ("GET", "/v2/capture/tagged/segments/seg-000000000001.cap"),
        ("DELETE", "/v2/capture/tagged/segments/seg-000000000001.cap"),
        ("POST", "/v2/capture/tagged/rollover"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = requests.request(method, captured_server.url + path, headers=headers, data=b"{}", timeout=10)
            assert answer.status_code == 401, (method, path)
    assert requests.get(captured_server.url + routes[0][1], headers=AUTH, timeout=10).json()["source"] == "model"


def test_a_rules_body_is_bounded(captured_server):
    url = f"{captured_server.url}/v2/repository/models/tagged/capture"
    huge = b'{"rate": 1, "classes": [' + b"1," * 20_000 + b"1]}"
    assert requests.put(url, data=huge, headers=AUTH, timeout=10).status_code == 413
    assert requests.put(url, data=b"[" * 100 + b"]" * 100, headers=AUTH, timeout=10).status_code == 400
    assert requests.put(url, data=b"", headers=AUTH, timeout=10).status_code == 400
    assert requests.get(url, headers=AUTH, timeout=10).json()["source"] == "model"


# -- crash safety -----------------------------------------------------------------------------


def test_kill_9_mid_capture_loses_at_most_the_record_being_written(tmp_path, onnx_linear_model):
    tagged = _with_capture(onnx_linear_model, tmp_path / "tagged", {"rate": 1.0})
    server = ServerProcess(tmp_path / "store", token=TOKEN).start()
    spool_dir = tmp_path / "store" / ".capture" / "tagged"
    stop = threading.Event()
    try:
        with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
            device.upload_model("tagged", tagged)

        def keep_asking():
            with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
                i = 0
                while not stop.is_set() and i < 100_000:
                    try:
                        device.infer("tagged", [np.full((1, 4), i, np.float32)])
                    except Exception:  # noqa: BLE001 (the server is killed under it)
                        return
                    i += 1

        asker = threading.Thread(target=keep_asking)
        asker.start()
        _wait_for(lambda: spool_dir.is_dir() and len(_samples(spool_dir)) >= 20)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        stop.set()
        server.stop()
    asker.join(timeout=30)
    before = _samples(spool_dir)
    open_segment = capture_format.segments(spool_dir)[-1]
    whole = open_segment.stat().st_size
    with open(open_segment, "ab") as stream:  # the record being written when the power went
        stream.write(capture_format.encode_sample(before[-1])[:-7])

    server = ServerProcess(tmp_path / "store", token=TOKEN).start()
    try:
        with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
            for i in range(3):
                device.infer("tagged", [np.full((1, 4), -1 - i, np.float32)])
        _wait_for(lambda: len(_samples(spool_dir)) == len(before) + 3)
    finally:
        server.stop()
    after = _samples(spool_dir)
    assert [s.timestamp for s in after[: len(before)]] == [s.timestamp for s in before]
    assert [float(s.inputs["x"][0, 0]) for s in after[len(before) :]] == [-1.0, -2.0, -3.0]
    assert capture_format.valid_length(open_segment) == open_segment.stat().st_size >= whole


# -- the deployments plugin -------------------------------------------------------------------


@pytest.mark.slow
def test_push_sets_capture_rules_on_each_device(captured_server, mlflow_store, onnx_linear_model, tmp_path):
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    client = get_deploy_client(f"arachne-jetson://127.0.0.1:{captured_server.port}")
    config = {"token": TOKEN, "report": "false"}
    with pytest.raises(MlflowException, match=r"config capture: unknown keys \['rte'\]"):
        client.create_deployment("pushed", str(onnx_linear_model), config={**config, "capture": '{"rte": 1}'})
    with DeviceClient("127.0.0.1", captured_server.port, token=TOKEN) as device:
        assert device.model_record("pushed") is None  # refused on the host, before any device was touched
    client.create_deployment("pushed", str(onnx_linear_model), config={**config, "capture": '{"rate": 0.5}'})
    with DeviceClient("127.0.0.1", captured_server.port, token=TOKEN) as device:
        assert device.capture_rules("pushed")["rules"]["rate"] == 0.5
        rules_file = tmp_path / "capture.yaml"
        rules_file.write_text("rate: 1.0\nper_hour: 9\noutput: y\nclasses: [1]\n")
        client.update_deployment("pushed", str(onnx_linear_model), config={**config, "capture": str(rules_file)})
        answer = device.capture_rules("pushed")
        assert answer["source"] == "device" and answer["rules"]["per_hour"] == 9 and answer["rules"]["classes"] == [1]
        client.update_deployment("pushed", str(onnx_linear_model), config={**config, "capture": "{}"})
        assert device.capture_rules("pushed") == {"model": "pushed", "source": "device", "rules": None}
    client.delete_deployment("pushed", config=config)
