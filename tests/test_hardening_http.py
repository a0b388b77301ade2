"""What an attacker (or a careless client) does to the device server over HTTP, against real server
processes: endless or trickling request heads, running out of file descriptors, request bodies that
cost many times their size to decode, large requests to a fast model, versioned inference during a
replace, benchmarks nobody waits for, metrics of deleted models, the bearer scheme, request ids.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec, json_data
from arachne_mlflow.server.dataplane import INLINE_SECONDS, Dataplane
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ServerProcess

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 2**20


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory):
    """x[N, 4] -> y[N, 3]: a fast model whose batch (and so request size) is free."""
    root = tmp_path_factory.mktemp("hardening-model")
    onnx_file = root / "linear.onnx"
    onnx_file.write_bytes(models.onnx_linear("N").SerializeToString())
    return write_model_dir(root / "linear", "onnx", onnx_file, runtime_details("onnx", onnx_file))


@pytest.fixture(scope="module")
def server(tmp_path_factory, linear_dir):
    process = ServerProcess(
        tmp_path_factory.mktemp("hardening") / "store",
        token=TOKEN,
        extra_args=["--head-timeout", "1", "--benchmark-seconds", "2", "--batching", "short-lived=4,500"],
    ).start()
    with DeviceClient("127.0.0.1", process.port, token=TOKEN) as owner:
        owner.upload_model("linear", linear_dir)
    yield process
    process.stop()


def _health(process) -> int:
    return requests.get(process.url + "/v2/health/live", timeout=30).status_code


def _infer_ok(process, name="linear") -> bool:
    with DeviceClient("127.0.0.1", process.port, token=process.token, timeout=30) as owner:
        return owner.infer(name, [np.ones((2, 4), np.float32)])["y"].shape == (2, 3)


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


class PeakMemory:
    """The server's resident memory at its highest during a block, above where it started (Linux:
    the high-water mark is reset through /proc/PID/clear_refs)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> PeakMemory:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._start = _status(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status(self.pid, "VmHWM") - self._start


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _flood(port: int, first: bytes, filler: bytes, limit: int) -> int:
    """Send `first`, then `filler` over and over (a head that never ends); the bytes the server took."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(first)
            while sent < limit:
                sock.sendall(filler)
                sent += len(filler)
        except OSError:  # closed by the server (reset, broken pipe)
            pass
    return sent


# -- request heads --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["header lines", "url"])
def test_an_endless_request_head_is_cut_off_without_growing_the_server(server, kind):
    first, filler = {
        "header lines": (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", b"a: b\r\n" * 10_000),
        "url": (b"GET /v2/health/live?", b"a" * 65_536),
    }[kind]
    health = []
    done = threading.Event()

    def check_health():
        while not done.is_set():
            health.append(_health(server))

    checker = threading.Thread(target=check_health)
    with PeakMemory(server.process.pid) as peak:
        checker.start()
        try:
            sent = _flood(server.port, first, filler, 48 * MiB)
        finally:
            done.set()
            checker.join()
    assert sent < 16 * MiB  # the server closed the connection (without the cap it takes all 48 MiB)
    assert peak.growth <= 16 * MiB, peak.growth / MiB
    assert health and set(health) == {200}
    assert _infer_ok(server)


def test_a_head_larger_than_64_kib_is_answered_431(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"b" * 70_000)  # then nothing more
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert b"larger than 65536 bytes" in reply
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # a large legitimate head
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 60_000 + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_heads_that_trickle_in_are_dropped_after_the_head_timeout(server):
    pid = server.process.pid
    before = _open_fds(pid)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    trickling = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(50)]
    for sock in trickling:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _open_fds(pid) > before:
        for sock in trickling:
            try:
                sock.send(b"X")  # a byte of a header name every 0.2 s: never a whole head
            except OSError:
                pass
        time.sleep(0.2)
    assert _open_fds(pid) <= before, "the server keeps connections whose head never arrives"
    for sock in [silent, *trickling]:
        reply = sock.recv(4096)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408 "), reply[:100]
        sock.close()
    assert _health(server) == 200 and _infer_ok(server)


@pytest.fixture(scope="module")
def limited(tmp_path_factory, linear_dir):
    """A server with a connection limit and a small JSON cap (long head timeout: idle sockets stay)."""
    process = ServerProcess(
        tmp_path_factory.mktemp("limited") / "store",
        extra_args=["--head-timeout", "60", "--limit-concurrency", "8", "--max-json-mb", "1"],
    ).start()
    with DeviceClient("127.0.0.1", process.port) as owner:
        owner.upload_model("linear", linear_dir)
    yield process
    process.stop()


def test_connections_beyond_the_limit_get_503(limited):
    before = _open_fds(limited.process.pid)
    idle = [socket.create_connection(("127.0.0.1", limited.port), timeout=30) for _ in range(8)]
    try:
        deadline = time.monotonic() + 20
        while _open_fds(limited.process.pid) < before + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.get(limited.url + "/v2/health/live", timeout=30).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 20
    while requests.get(limited.url + "/v2/health/live", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the limit does not free up once connections close"
        time.sleep(0.1)


def test_running_out_of_file_descriptors_is_a_503_and_passes(tmp_path, linear_dir):
    process = ServerProcess(tmp_path / "store", extra_args=["--head-timeout", "60"]).start()
    try:
        pid = process.process.pid
        upload = socket.create_connection(("127.0.0.1", process.port), timeout=60)  # before the descriptors run out
        limit = _open_fds(pid) + 24
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        idle = []
        deadline = time.monotonic() + 30
        while _open_fds(pid) < limit and time.monotonic() < deadline:
            idle.append(socket.create_connection(("127.0.0.1", process.port), timeout=60))
            time.sleep(0.01)
        archive = _model_tar(linear_dir)
        upload.sendall(
            b"PUT /v2/repository/models/linear HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(archive)
            + archive
        )
        reply = _read_response(upload)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:300]
        assert b"out of file descriptors" in reply and b"retry-after: 1" in reply.lower()
        for sock in [upload, *idle]:
            sock.close()
        deadline = time.monotonic() + 30
        while _open_fds(pid) >= limit - 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        with DeviceClient("127.0.0.1", process.port, timeout=60) as owner:
            assert owner.upload_model("linear", linear_dir)
        assert _infer_ok(process)
    finally:
        process.stop()


def _model_tar(model_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def _read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (or what came before the server closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# -- decoding ---------------------------------------------------------------------------------------


def _json_body(name, datatype, shape, data, **extra) -> bytes:
    tensor = {"name": name, "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _memory_cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((250_000, 4)).astype(np.float32)  # as tritonclient writes float32: ~20 characters
    short = [0.5] * 4_000_000
    count = 2_000_000
    blob = {"name": "x", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": 5 * count}}
    blob_head = json.dumps({"inputs": [blob]}).encode()
    binary = {"parameters": {"binary_data_output": True}}
    return {
        "JSON floats": (_json_body("x", "FP32", [250_000, 4], x.ravel().tolist(), **binary), {}, 200),
        "JSON floats, JSON answer": (_json_body("x", "FP32", [250_000, 4], x.ravel().tolist()), {}, 200),
        "JSON short floats": (_json_body("x", "FP32", [1_000_000, 4], short, **binary), {}, 200),
        "JSON wrong shape": (_json_body("x", "FP32", [800_000, 5], short), {}, 400),
        "JSON unknown input": (_json_body("z", "FP32", [1_000_000, 4], short), {}, 400),
        "JSON BYTES": (_json_body("x", "BYTES", [count], ["a"] * count), {}, 400),
        "binary BYTES": (
            blob_head + b"\x01\x00\x00\x00a" * count,
            {"Inference-Header-Content-Length": str(len(blob_head))},
            400,
        ),
    }


@pytest.fixture(scope="module")
def stored_linear(tmp_path_factory, linear_dir):
    """A model store that holds `linear`, copied for each server that must start afresh."""
    store = tmp_path_factory.mktemp("stored-linear") / "store"
    process = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", process.port) as owner:
            owner.upload_model("linear", linear_dir)
    finally:
        process.stop()
    return store


@pytest.mark.parametrize("case", list(_memory_cases()))
def test_decoding_a_request_takes_at_most_4x_its_body(stored_linear, tmp_path, case):
    body, headers, status = _memory_cases()[case]
    assert len(body) > 8 * MiB
    shutil.copytree(stored_linear, tmp_path / "store")
    process = ServerProcess(tmp_path / "store").start()  # afresh: no freed memory of earlier requests to reuse
    try:
        assert _infer_ok(process)  # (warm: the first request's allocations are not the body's)
        with PeakMemory(process.process.pid) as peak:
            response = requests.post(process.url + "/v2/models/linear/infer", data=body, headers=headers, timeout=120)
        assert response.status_code == status, response.text[:300]
        assert peak.growth <= 4 * len(body), f"{peak.growth / len(body):.1f}x the body"
    finally:
        process.stop()


def _large_json_cases() -> dict[str, bytes]:
    n = 20_000
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    ints = rng.integers(-100, 100, (n, 4))
    rows = {"name": "a", "datatype": "FP32", "shape": [2, n], "data": [[1.0] * n, [2.0] * n]}
    nested = json.dumps({"inputs": [rows]}).encode()
    cases = {
        "flat": _json_body("x", "FP32", [n, 4], x.ravel().tolist()),
        "nested": _json_body("x", "FP32", [n, 4], x.tolist()),
        "indented": json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n // 8, 4], "data": x[: n // 8].tolist()}]},
            indent=2,
        ).encode(),
        "NaN and Infinity": _json_body("x", "FP64", [n], [np.nan, np.inf, -np.inf] + [0.5] * (n - 3), id="r"),
        "two tensors, an id": json.dumps(
            {
                "id": 7,
                "inputs": [
                    {"name": "a", "datatype": "FP16", "shape": [n], "data": [0.5] * n},
                    {"name": "b", "datatype": "INT64", "shape": [2, n // 2], "data": [[3] * (n // 2)] * 2},
                ],
            }
        ).encode(),
        "data under parameters too": json.dumps(
            {
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [n], "parameters": {"data": [1, 2]}, "data": [0.5] * n}
                ]
            }
        ).encode(),
        "empty tensor": json.dumps(
            {
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [2, 0], "data": [[], []]},
                    {"name": "b", "datatype": "FP32", "shape": [n], "data": [100_000] * n},
                ]
            }
        ).encode(),
        "int beyond INT8": _json_body("x", "INT8", [n, 4], (ints * 10).tolist()),
        "float for INT32": _json_body("x", "INT32", [n], [1.5] + [100_000] * (n - 1)),
        "bool for FP32": _json_body("x", "FP32", [n], [True] + [1.0] * (n - 1)),
        "negative for UINT8": _json_body("x", "UINT8", [n], [-1] + [100] * (n - 1)),
        "numbers for BYTES": _json_body("x", "BYTES", [n], [100_000] * n),
        "too few numbers": _json_body("x", "FP32", [n + 1], [1.0] * n),
        "no data": json.dumps(
            {"inputs": [{"name": "a", "datatype": "FP32", "shape": [n], "parameters": {"data": [100_000] * n}}]}
        ).encode(),
        "data is a number": json.dumps(
            {
                "inputs": [
                    {"name": "a", "datatype": "FP32", "shape": [1], "data": 0},
                    {"name": "b", "datatype": "FP32", "shape": [n], "data": [100_000] * n},
                ]
            }
        ).encode(),
        "]] too many": nested.replace(b"], [", b"]], [[", 1),
        "a number then a list": nested.replace(b"1.0, 1.0", b"1.0 [1.0", 1),
        "an empty element": nested.replace(b"1.0, 1.0", b"1.0,, 1.0", 1),
        "lists without a comma": nested.replace(b"], [", b"] [", 1),
        "a closing bracket more": nested.replace(b"]]}", b"]]]}", 1),
        "hexadecimal": nested.replace(b"1.0, 1.0", b"0x1, 1.0", 1),
        "a plus sign": nested.replace(b"1.0, 1.0", b"+1.0, 1.0", 1),
        "lower-case nan": nested.replace(b"1.0, 1.0", b"nan, 1.0", 1),
        "malformed after the data": nested.replace(b"]]}]}", b"]]}]]}", 1),
    }
    for dtype in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64", "FP16", "BF16", "FP64", "BOOL"):
        values = (ints > 0) if dtype == "BOOL" else np.abs(ints) if dtype.startswith("U") else ints
        cases[dtype] = _json_body("x", dtype, [n, 4], values.tolist())
    return cases


@pytest.mark.parametrize("case", list(_large_json_cases()))
def test_large_json_is_read_as_a_json_parser_reads_it(case, monkeypatch):
    """Numbers read from the text (`json_data`) are the parser's numbers; what it refuses is refused."""
    body = _large_json_cases()[case]
    assert len(body) > json_data.SMALL_MESSAGE

    def decode():
        try:
            request = codec.decode_request(body, None)
        except InvalidInputError:
            return None
        return request.id, {name: (a.dtype, a.shape, a.tobytes()) for name, a in request.inputs.items()}

    lifted = decode()
    monkeypatch.setattr(json_data, "SMALL_MESSAGE", len(body))  # parsed whole, as small messages are
    assert lifted == decode()


def test_json_bodies_have_their_own_lower_cap(limited):
    x = np.random.default_rng(0).standard_normal((50_000, 4)).astype(np.float32)  # 800 KB; ~4 MiB as JSON
    with DeviceClient("127.0.0.1", limited.port) as owner:
        assert owner.infer("linear", [x])["y"].shape == (50_000, 3)  # binary: under --max-request-mb
        with pytest.raises(Exception, match="exceeds the limit of 1048576"):
            owner.infer("linear", [x], binary=False)
    framed = b'{"inputs": []}' + b" " * (2 * MiB)
    response = requests.post(
        limited.url + "/v2/models/linear/infer",
        data=framed,
        headers={"Inference-Header-Content-Length": str(len(framed))},
        timeout=60,
    )
    assert response.status_code == 413 and "JSON part" in response.json()["error"]


def test_a_large_request_to_a_fast_model_does_not_run_on_the_event_loop(tmp_path, linear_dir):
    """The loop keeps turning while a large request to a model that answers in microseconds decodes."""
    body = _json_body("x", "FP32", [400_000, 4], [0.5] * 1_600_000)

    async def scenario() -> tuple[int, bytes]:
        dataplane = Dataplane(ModelStore(tmp_path / "store"))
        await dataplane.start()
        try:
            await dataplane.run_blocking(dataplane.store.put, "fast", _tar_stream(linear_dir))
            small = _json_body("x", "FP32", [1, 4], [0.5] * 4)
            await dataplane.infer("fast", small, None)
            # (how a model that answers in microseconds looks to the inline rule, on a busy machine too)
            dataplane.metrics.models["fast"].recent_seconds = INLINE_SECONDS / 10
            turns = 0
            work = asyncio.ensure_future(dataplane.infer("fast", body, None))
            while not work.done():
                turns += 1
                await asyncio.sleep(0)
            return turns, (await work)[0]
        finally:
            await dataplane.close()

    turns, answer = asyncio.run(scenario())
    assert json.loads(answer)["outputs"][0]["shape"] == [400_000, 3]
    assert turns > 1, "the request ran on the event loop: every other connection waited for it"


def _tar_stream(model_dir: Path) -> io.BytesIO:
    return io.BytesIO(_model_tar(model_dir))


# -- versions, benchmarks, metrics ------------------------------------------------------------------


def test_a_versioned_infer_is_answered_by_that_version_only(server, linear_dir):
    with DeviceClient("127.0.0.1", server.port, token=TOKEN, timeout=60) as owner:
        owner.upload_model("versioned", linear_dir)
        version = owner.model_record("versioned")["revision"]
        body = _json_body("x", "FP32", [1, 4], [1.0, 2.0, 3.0, 4.0])
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(
                b"POST /v2/models/versioned/versions/%d/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                b"Content-Length: %d\r\n\r\n" % (version, TOKEN.encode(), len(body)) + body[:10]
            )
            time.sleep(0.3)  # the server has read the head (and checked the version) and waits for the body
            owner.upload_model("versioned", linear_dir, force=True)  # now the next version serves
            assert owner.model_record("versioned")["revision"] == version + 1
            sock.sendall(body[10:])
            reply = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 404 "), reply[:300]
    assert b"has no version" in reply


def test_benchmarks_are_bounded_stop_with_their_client_and_leave_the_pool_alone(server, linear_dir):
    pid = server.process.pid
    start = time.monotonic()
    result = requests.post(
        server.url + "/v2/models/linear/benchmark", json={"repeat": 10_000, "number": 1000}, headers=AUTH, timeout=120
    )
    assert result.status_code == 200 and result.json()["repeat"] < 10_000  # --benchmark-seconds 2
    assert time.monotonic() - start < 60

    def abandoned_benchmark():
        with pytest.raises(requests.Timeout):
            requests.post(
                server.url + "/v2/models/linear/benchmark",
                json={"repeat": 10_000, "number": 1000},
                headers=AUTH,
                timeout=1.5,
            )

    clients = [threading.Thread(target=abandoned_benchmark) for _ in range(6)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    assert requests.get(server.url + "/v2", headers=AUTH, timeout=20).status_code == 200
    assert _infer_ok(server)
    with DeviceClient("127.0.0.1", server.port, token=TOKEN, timeout=20) as owner:
        assert owner.upload_model("benchmarked-meanwhile", linear_dir)
    for client in clients:
        client.join()
    time.sleep(0.5)
    busy = _cpu_seconds(pid)
    time.sleep(2)
    assert _cpu_seconds(pid) - busy < 0.5, "benchmarks kept running after their clients left"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_deleted_model_leaves_no_metrics(server, linear_dir):
    label = 'model="short-lived"'
    with DeviceClient("127.0.0.1", server.port, token=TOKEN) as owner:
        owner.upload_model("short-lived", linear_dir)
        owner.infer("short-lived", [np.ones((1, 4), np.float32)])
        assert label in requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
        owner.delete_model("short-lived")
    assert label not in requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text


# -- authorization and request ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
        (f"BEARER {TOKEN}", 200),
        (f"Bearer   {TOKEN}", 200),
        (f"Basic {TOKEN}", 401),
        (f"Bearer{TOKEN}", 401),
        (f"Bearer {TOKEN}x", 401),
        ("Bearer", 401),
        (TOKEN, 401),
    ],
)
def test_the_bearer_scheme_is_case_insensitive(server, authorization, status):
    response = requests.get(server.url + "/v2/models/linear", headers={"Authorization": authorization}, timeout=30)
    assert response.status_code == status


@pytest.mark.parametrize(
    ("request_id", "echoed"), [("req-7", "req-7"), (42, "42"), (2.5, "2.5"), (-(2**63), "-9223372036854775808")]
)
def test_a_request_id_is_echoed_as_a_string(server, request_id, echoed):
    """The protocol's schema says the id is a string: a number sent by a lenient client comes back as one."""
    import tritonclient.http as httpclient

    body = json.dumps(
        {"id": request_id, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    ).encode()
    response = requests.post(server.url + "/v2/models/linear/infer", data=body, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.json()["id"] == echoed
    result = httpclient.InferResult.from_response_body(response.content)
    assert result.get_response()["id"] == echoed and result.as_numpy("y").shape == (1, 3)


@pytest.mark.parametrize("request_id", [{"a": 1}, [1], True, 2**64])
def test_a_request_id_that_is_no_string_or_number_is_refused(server, request_id):
    # (NaN: read by the stdlib, which keeps 2**64 an integer; orjson would make it a float)
    body = json.dumps(
        {"id": request_id, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, np.nan]}]}
    ).encode()
    response = requests.post(server.url + "/v2/models/linear/infer", data=body, headers=AUTH, timeout=30)
    assert response.status_code == 400 and "'id' must be a string" in response.json()["error"]
