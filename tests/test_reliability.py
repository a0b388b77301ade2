"""Reliability of the device server: hostile infer requests, fuzzing, faults and load, with nothing lost.

Each test runs real server processes on free loopback ports (tests/model_dirs.py) and checks
after every hostile input or fault that every model the server had still answers correctly.
Extends tests/test_server.py (15 malformed requests, kill -9 during one upload) without repeating it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import DeviceUnreachableError, InvalidInputError
from tests.helpers import models
from tests.helpers.archives import tar_bytes, tar_member
from tests.helpers.model_dirs import scaled_linear
from tests.helpers.servers import ServerProcess, rss_bytes
from tests.helpers.v2 import BAD_REQUESTS, app_routes, binary_body, local_outputs, model_inputs

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

SERVED = ["onnx_linear", "tvm_linear", "tflite_cnn", "onnx_two_io"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_models):
    process = ServerProcess(tmp_path_factory.mktemp("reliability") / "store").start()
    with DeviceClient("127.0.0.1", process.port) as device:
        for name in SERVED:
            device.upload_model(name, mlflow_models[name])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def expected(mlflow_models):
    """A fixed input per served model and its local result: what the server must keep answering."""
    cases = {}
    for name in SERVED:
        x = model_inputs(mlflow_models[name], batch=1)
        cases[name] = (x, local_outputs(mlflow_models[name], x))
    return cases


def assert_serves_everything(port, expected, token=None):
    assert requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200
    with DeviceClient("127.0.0.1", port, token=token) as device:
        for name, (x, want) in expected.items():
            got = device.infer(name, x)
            for key in want:
                np.testing.assert_equal(got[key], want[key])


# -- hostile infer requests --------------------------------------------------------------------

X = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}


def _json(header):
    return json.dumps(header).encode(), {}


def _with(**fields):
    return {"inputs": [{**X, **fields}]}


def _gzip(body):
    return gzip.compress(body), {"Content-Encoding": "gzip"}


MORE_BAD_REQUESTS = {  # beyond test_server's BAD_REQUESTS (which run here too, against every model)
    "truncated json": (json.dumps({"inputs": [X]}).encode()[:25], {}),
    "empty body": (b"", {}),
    "json array": (b"[1, 2, 3]", {}),
    "json string": (b'"inputs"', {}),
    "not utf-8": (b'{"inputs": "\xff\xfe"}', {}),
    "no inputs": _json({}),
    "inputs not a list": _json({"inputs": "x"}),
    "input not an object": _json({"inputs": [7]}),
    "input without name": _json({"inputs": [{"datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]}),
    "duplicate input": _json({"inputs": [X, X]}),
    "missing datatype": _json(_with(datatype=None)),
    "datatype not a string": _json(_with(datatype=["FP32"])),
    "lowercase datatype": _json(_with(datatype="fp32")),
    "shape not a list": _json(_with(shape="1,4")),
    "negative dimension": _json(_with(shape=[-1, 4])),
    "float dimension": _json(_with(shape=[1.0, 4])),
    "bool dimension": _json(_with(shape=[True, 4])),
    "33 dimensions": _json(_with(shape=[1] * 33, data=[0])),
    "terabyte json shape": _json(_with(shape=[1 << 20, 1 << 20], data=[0])),
    "exabyte shape": _json(_with(shape=[1 << 62, 1 << 62], data=[0])),
    "terabyte bytes shape": binary_body(
        {"inputs": [{**X, "datatype": "BYTES", "shape": [1 << 40], "parameters": {"binary_data_size": 8}}]}, bytes(8)
    ),
    "data not a list": _json(_with(data=7)),
    "data of objects": _json(_with(data=[{}, {}, {}, {}])),
    "data of nulls": _json(_with(data=[None] * 4)),
    "nested too deep": (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * 50_000
        + b"1"
        + b"]" * 50_000
        + b"}]}",
        {},
    ),
    "number too big for FP32": _json(_with(data=[10**400, 1, 2, 3])),
    "binary size too small": binary_body(_with(data=None, parameters={"binary_data_size": 8}), bytes(8)),
    "binary size too large": binary_body(_with(data=None, parameters={"binary_data_size": 32}), bytes(32)),
    "binary size negative": binary_body(_with(data=None, parameters={"binary_data_size": -16}), bytes(16)),
    "binary size a string": binary_body(_with(data=None, parameters={"binary_data_size": "16"}), bytes(16)),
    "binary size a float": binary_body(_with(data=None, parameters={"binary_data_size": 16.0}), bytes(16)),
    "binary bytes unclaimed": binary_body({"inputs": [X]}, bytes(16)),
    "binary without header length": (
        json.dumps(_with(data=None, parameters={"binary_data_size": 16})).encode() + bytes(16),
        {},
    ),
    "header length zero": (json.dumps({"inputs": [X]}).encode(), {"Inference-Header-Content-Length": "0"}),
    "header length huge": (json.dumps({"inputs": [X]}).encode(), {"Inference-Header-Content-Length": "9" * 40}),
    "header length hex": (json.dumps({"inputs": [X]}).encode(), {"Inference-Header-Content-Length": "0x10"}),
    "BYTES binary for numeric": binary_body(
        {"inputs": [{**X, "datatype": "BYTES", "data": None, "parameters": {"binary_data_size": 20}}]},
        b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(4)) + bytes(4),
    ),
    "INT64 for FP32": _json(_with(datatype="INT64")),
    "BOOL for FP32": _json(_with(datatype="BOOL", data=[True, False, True, False])),
    "parameters not an object": _json({"inputs": [X], "parameters": [1]}),
    "input parameters not an object": _json(_with(parameters="binary")),
    "outputs not a list": _json({"inputs": [X], "outputs": "y"}),
    "output without name": _json({"inputs": [X], "outputs": [{}]}),
    "output parameters not an object": _json({"inputs": [X], "outputs": [{"name": "y", "parameters": [1]}]}),
    "unknown output": _json({"inputs": [X], "outputs": [{"name": "nope"}]}),
    "gzip truncated": (gzip.compress(json.dumps({"inputs": [X]}).encode())[:-12], {"Content-Encoding": "gzip"}),
    "gzip of garbage": _gzip(b"\x00garbage{"),
    "deflate of gzip": (gzip.compress(b"{}"), {"Content-Encoding": "deflate"}),
}
ALL_BAD_REQUESTS = {**BAD_REQUESTS, **MORE_BAD_REQUESTS}


@pytest.mark.parametrize("model", ["onnx_linear", "tvm_linear"])  # both take x: FP32 [1, 4]
def test_every_bad_request_is_4xx_and_every_model_still_serves(server, expected, model):
    assert len(ALL_BAD_REQUESTS) >= 60
    for case, (body, headers) in ALL_BAD_REQUESTS.items():
        response = requests.post(f"{server.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
        assert response.json()["error"], case
        assert_serves_everything(server.port, expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_nan_and_inf_pass_through_every_runtime(server, mlflow_models, binary):
    with DeviceClient("127.0.0.1", server.port) as device:
        for name in ("onnx_linear", "tvm_linear", "tflite_cnn"):
            x = model_inputs(mlflow_models[name], batch=1)
            key = next(iter(x))
            flat = x[key].reshape(-1)
            flat[:3] = [np.nan, np.inf, -np.inf]
            want = local_outputs(mlflow_models[name], x)
            got = device.infer(name, x, binary=binary)
            for out in want:
                np.testing.assert_array_equal(got[out], want[out])  # NaN equals NaN here
            if name == "onnx_linear":  # relu(NaN) is NaN there: the values did travel both ways
                assert np.isnan(got["y"]).any()


def _corrupt_model_dirs(mlflow_models, root):
    """Model dirs whose MLmodel is fine but whose model file is not: every runtime, garbage and truncated."""
    cases = {}
    for name, file in (("onnx_linear", "model.onnx"), ("tflite_cnn", "model.tflite"), ("tvm_linear", "model.so")):
        original = (mlflow_models[name] / file).read_bytes()
        for kind, content in (
            ("garbage", bytes(range(256)) * 16),
            ("truncated", original[: len(original) // 2]),
            ("empty", b""),
        ):
            directory = shutil.copytree(mlflow_models[name], root / f"{name}-{kind}")
            (directory / file).write_bytes(content)
            cases[f"{name}-{kind}"] = directory
    return cases


def test_corrupt_model_files_are_refused_and_the_old_version_keeps_serving(server, mlflow_models, expected, tmp_path):
    with DeviceClient("127.0.0.1", server.port) as device:
        before = {name: device.model_record(name)["digest"] for name in SERVED}
        for case, directory in _corrupt_model_dirs(mlflow_models, tmp_path).items():
            target = case.rsplit("-", 1)[0]
            for name in (target, "fresh"):  # a replace and a first upload
                with pytest.raises(Exception, match=r"HTTP 4\d\d") as caught:
                    device.upload_model(name, directory, force=True)
                assert 400 <= caught.value.status_code < 500, case
            assert_serves_everything(server.port, expected)
        assert device.model_record("fresh") is None
        assert {name: device.model_record(name)["digest"] for name in SERVED} == before


# -- property-based fuzzing of the HTTP API ----------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
_datatypes = st.sampled_from(["FP32", "FP64", "FP16", "INT8", "INT64", "UINT8", "BOOL", "BYTES", "fp32", "X", ""])
_dims = st.integers(-2, 2**40) | st.sampled_from([0, 1, 4])
_tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "y", "a", ""]) | st.text(max_size=4)},
    optional={
        "datatype": _datatypes | _json_values,
        "shape": st.lists(_dims, max_size=4) | _json_values,
        "data": st.lists(st.integers(-300, 300) | st.floats() | st.booleans() | st.text(max_size=2), max_size=6)
        | _json_values,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-8, 64) | _json_values, "binary_data": _json_values}
        )
        | _json_values,
    },
)
_request = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, max_size=3) | _json_values},
    optional={
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["y", "z"]) | _json_values}, optional={"parameters": _json_values}
            ),
            max_size=2,
        )
        | _json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": _json_values}) | _json_values,
        "id": _json_values,
    },
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(
    request=_request,
    blob=st.binary(max_size=64),
    model=st.sampled_from(["onnx_linear", "tvm_linear", "tflite_cnn"]),
    header_length=st.none()
    | st.just("auto")
    | st.integers(-2, 200).map(str)
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),
)
def _fuzz_infer(server, request, blob, model, header_length):
    head = json.dumps(request).encode()
    headers = {}
    if header_length == "auto":
        headers["Inference-Header-Content-Length"] = str(len(head))
    elif header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    response = requests.post(f"{server.url}/v2/models/{model}/infer", data=head + blob, headers=headers, timeout=30)
    assert response.status_code < 500, (request, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["error"]


_header_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    return app_routes(tmp_path_factory.mktemp("routes"))


@FUZZ
@given(
    data=st.data(),
    body=st.binary(max_size=256) | _json_values.map(lambda v: json.dumps(v).encode()),
    name=st.sampled_from(SERVED + ["nope"]) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Content-Encoding",
                "Inference-Header-Content-Length",
                "Arachne-Provenance",
                "Content-Type",
                "Authorization",
            ]
        ),
        _header_values,
        max_size=3,
    ),
)
def _fuzz_route(server, routes, data, body, name, headers):
    method, path = data.draw(st.sampled_from(routes))
    if method in ("PUT", "DELETE") or path.endswith(("/load", "/unload", "/rollback")):
        name = "fuzz-" + "".join(c for c in name if c.isalnum())[:8]  # never touch a served model
    path = path.replace("/models/m", "/models/" + quote(name, safe=""), 1)
    response = requests.request(method, server.url + path, data=body, headers=headers, timeout=30)
    assert response.status_code < 500, (method, path, headers, response.text[:300])


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=6))
def _fuzz_archive(server, mlflow_models, cut, flips):
    source = mlflow_models["onnx_linear"]
    raw = bytearray(tar_bytes([tar_member(n, (source / n).read_bytes()) for n in ("MLmodel", "model.onnx")]))
    for where, value in flips:
        raw[where % len(raw)] ^= value
    body = bytes(raw[: len(raw) - cut])
    response = requests.put(f"{server.url}/v2/repository/models/fuzz-upload", data=body, timeout=30)
    assert response.status_code < 500, response.text[:300]
    if response.status_code == 200:  # a flip that still makes a loadable model: it must serve
        requests.delete(f"{server.url}/v2/repository/models/fuzz-upload", timeout=30).raise_for_status()


def _survived(server, expected):
    """After a fuzzing run: the server is up, serves every model as before, and kept nothing fuzzed."""
    assert server.process.poll() is None
    assert_serves_everything(server.port, expected)
    assert sorted(p.name for p in server.store.iterdir()) == sorted([".arachne-model-store", *SERVED])


def test_fuzzed_infer_requests_never_5xx(server, expected):
    _fuzz_infer(server)
    _survived(server, expected)


def test_fuzzed_calls_to_every_route_never_5xx(server, expected, routes):
    _fuzz_route(server, routes)
    _survived(server, expected)


def test_fuzzed_archives_are_4xx_or_a_valid_model(server, expected, mlflow_models):
    _fuzz_archive(server, mlflow_models)
    _survived(server, expected)


# -- faults ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two versions of one model (same input, different outputs), each with its digest and expected output."""
    from arachne_mlflow.model.digest import files_digest
    from arachne_mlflow.model.directory import read_model_dir

    root = tmp_path_factory.mktemp("versions")
    x = {"x": np.array([[0.5, 1.0, 1.5, 2.0]], np.float32)}
    versions = []
    for scale in (1.0, -3.0):
        directory = scaled_linear(root, scale, padding=2 * 1024**2)
        files = read_model_dir(directory).files()
        versions.append(
            {"dir": directory, "digest": files_digest(directory, files), "y": local_outputs(directory, x)["y"]}
        )
    assert not np.array_equal(versions[0]["y"], versions[1]["y"])
    return x, versions


def _leftovers(store: Path) -> list[str]:
    """What a crash left: uploads in progress, versions neither current nor kept as previous, temporary records."""
    found = []
    for directory in (p for p in store.iterdir() if p.is_dir()):
        current = directory / "CURRENT.json"
        if not current.exists():
            found.append(f"{directory.name}/ (no CURRENT.json)")
            continue
        record = json.loads(current.read_text())
        keep = {"CURRENT.json", record["version_dir"], (record.get("previous") or {}).get("version_dir")}
        found += [f"{directory.name}/{p.name}" for p in directory.iterdir() if p.name not in keep]
    return found


def _leftovers_now(store: Path) -> list[str]:
    """`_leftovers` of a store the server is writing to (a directory may vanish while it is read)."""
    try:
        return _leftovers(store)
    except (OSError, ValueError):
        return []


def _assert_store_is_clean(store: Path) -> None:
    assert _leftovers(store) == []
    for directory in (p for p in store.iterdir() if p.is_dir()):
        version = json.loads((directory / "CURRENT.json").read_text())["version_dir"]
        assert (directory / version / "MLmodel").is_file()


def test_kill_9_during_replaces_and_uploads_keeps_every_complete_version(tmp_path, two_versions):
    """Kill the server at several moments while it replaces one model and receives new ones, then restart."""
    x, versions = two_versions
    store = tmp_path / "store"
    report = {"kills": 0, "leftovers cleaned": 0, "interrupted": 0}
    known_new: set[str] = set()
    for round_, delay in enumerate([0.05, 0.15, 0.3, 0.45, 0.6, 0.8]):
        process = ServerProcess(store).start()
        with DeviceClient("127.0.0.1", process.port) as device:
            if round_ == 0:
                device.upload_model("swap", versions[0]["dir"])
            _check_after_restart(device, x, versions, known_new)
            stop, failures = threading.Event(), []

            def churn():
                with DeviceClient("127.0.0.1", process.port, timeout=30) as own:
                    i = 0
                    while not stop.is_set():
                        try:
                            own.upload_model("swap", versions[i % 2]["dir"], force=True)
                            known_new.add(name := f"new-{round_}-{i}")
                            own.upload_model(name, versions[0]["dir"])
                        except DeviceUnreachableError:
                            return
                        except Exception as err:  # noqa: BLE001 (reported below)
                            failures.append(err)
                            return
                        i += 1

            thread = threading.Thread(target=churn)
            thread.start()
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                time.sleep(0.01)
            if round_ % 2:  # odd rounds: wait for a moment when a write is under way (even: kill at the time)
                deadline = time.monotonic() + 10
                while not _leftovers_now(store) and time.monotonic() < deadline:
                    time.sleep(0.002)
            process.process.kill()
            process.process.wait()
            stop.set()
            thread.join(timeout=60)
            assert failures == []
        report["kills"] += 1
        left = _leftovers(store)
        report["leftovers cleaned"] += len(left)
        report["interrupted"] += bool(left)
        process.stop()
    final = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", final.port) as device:
            _check_after_restart(device, x, versions, known_new)
    finally:
        final.stop()
    _assert_store_is_clean(store)
    assert report["interrupted"] >= 3, report  # the odd rounds at least killed it in the middle of a write
    print(f"\nkill -9 during replaces: {report}")


def _check_after_restart(device, x, versions, known_new):
    """Every model serves a complete version: `swap` one of the two, each `new-*` the first."""
    digests = {v["digest"]: v for v in versions}
    index = {m["name"]: m for m in device.repository_index()}
    assert all(m["state"] == "READY" for m in index.values()), index
    info = device.model_record("swap")
    assert info["digest"] in digests
    np.testing.assert_equal(device.infer("swap", x)["y"], digests[info["digest"]]["y"])
    for name in set(index) - {"swap"}:
        assert name in known_new or name.startswith("new-")
        assert device.model_record(name)["digest"] == versions[0]["digest"]
        np.testing.assert_equal(device.infer(name, x)["y"], versions[0]["y"])


def _foreign_library(original: Path, path: Path) -> Path:
    """The real TVM library with its ELF machine set to aarch64: a library built for another machine."""
    data = bytearray(original.read_bytes())
    assert data[:4] == b"\x7fELF"
    data[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    path.write_bytes(bytes(data))
    return path


def test_loading_failures_leave_the_server_up(server, mlflow_models, expected, tmp_path):
    foreign = shutil.copytree(mlflow_models["tvm_linear"], tmp_path / "foreign")
    _foreign_library(mlflow_models["tvm_linear"] / "model.so", foreign / "model.so")
    with DeviceClient("127.0.0.1", server.port) as device:
        before = device.model_record("tvm_linear")
        for name in ("tvm_linear", "foreign"):
            with pytest.raises(Exception, match="cannot load") as caught:
                device.upload_model(name, foreign, force=True)
            assert caught.value.status_code == 400
        assert device.model_record("tvm_linear") == before and device.model_record("foreign") is None
    assert_serves_everything(server.port, expected)


def test_a_library_that_crashes_while_loading_is_refused_and_the_server_stays_up(tmp_path, mlflow_models, expected):
    """An upload is first loaded in a child process: native code that aborts there is a refused upload
    (400), not a dead server, and every model keeps serving its last version."""
    crashing = shutil.copytree(mlflow_models["tvm_linear"], tmp_path / "crashing")
    models.crashing_library(crashing / "model.so")
    store = tmp_path / "store"
    process = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", process.port) as device:
            for served in SERVED:
                device.upload_model(served, mlflow_models[served])
            before = {served: device.model_record(served) for served in SERVED}
            for name in ("tvm_linear", "crash-new"):  # a replace, then a first upload
                with pytest.raises(InvalidInputError, match=r"crashed the runtime while loading \(SIGABRT\)") as caught:
                    device.upload_model(name, crashing, force=True)
                assert caught.value.status_code == 400
            assert process.process.poll() is None
            assert {served: device.model_record(served) for served in SERVED} == before
            assert device.model_record("crash-new") is None
        assert_serves_everything(process.port, expected)
    finally:
        process.stop()
    _assert_store_is_clean(store)


# -- clients whose server goes away ------------------------------------------------------------


class _Listener:
    """A TCP port that accepts connections and then never answers (or, with `hang_up`, closes them)."""

    def __init__(self, hang_up: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hang_up = hang_up
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            if self.hang_up:
                connection.close()
            else:
                self.held.append(connection)

    def close(self):
        self.sock.close()
        for connection in self.held:
            connection.close()


def _finishes(call, seconds=30.0):
    """Run `call` in a thread; return the exception it raised, failing if it has not returned in `seconds`."""
    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 (inspected by the test)
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"the call still hangs after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("hang_up", [False, True], ids=["never-answers", "hangs-up"])
def test_a_silent_or_hanging_up_server_gives_an_error_naming_it(hang_up, mlflow_models, onnx_linear_file):
    listener = _Listener(hang_up)
    where = f"127.0.0.1:{listener.port}"
    try:
        with DeviceClient("127.0.0.1", listener.port, timeout=0.5, upload_timeout=0.5) as device:
            calls = [
                device.ready,
                device.repository_index,
                lambda: device.infer("m", {"x": np.ones((1, 4), np.float32)}),
                lambda: device.upload_model("m", mlflow_models["onnx_linear"], force=True),
            ]
            for call in calls:
                error = _finishes(call)
                assert isinstance(error, DeviceUnreachableError) and where in str(error), repr(error)
        error = _finishes(
            lambda: arachne_runtime.init(
                "onnx",
                model_file=str(onnx_linear_file),
                rpc_info={"host": "127.0.0.1", "port": listener.port, "timeout": 0.5},
            )
        )
        assert isinstance(error, DeviceUnreachableError) and where in str(error), repr(error)
    finally:
        listener.close()


def test_a_server_that_dies_mid_session_gives_an_error_naming_it(tmp_path, mlflow_models):
    process = ServerProcess(tmp_path / "store").start()
    with DeviceClient("127.0.0.1", process.port, timeout=5) as device:
        device.upload_model("linear", mlflow_models["onnx_linear"])
        x = [np.ones((1, 4), np.float32)]
        assert device.infer("linear", x)["y"].shape == (1, 3)  # a kept-alive connection is now open
        process.process.kill()
        process.process.wait()
        process.stop()
        for call in (lambda: device.infer("linear", x), device.live, device.repository_index):
            error = _finishes(call)
            assert isinstance(error, DeviceUnreachableError), repr(error)
            assert f"127.0.0.1:{process.port}" in str(error)


# -- load --------------------------------------------------------------------------------------


def _load_phase(port, seconds, cases, swap_versions):
    """16 client threads for `seconds` against two models while `replacer` replaces one of them."""
    counts, failures, stop = [0] * 16, [], threading.Event()

    def client(i):
        with DeviceClient("127.0.0.1", port, timeout=60) as own:
            while not stop.is_set():
                name = "steady" if i % 2 else "swap"
                x, accepted = cases[name]
                try:
                    got = own.infer(name, x)
                    if not any(all(np.array_equal(got[k], want[k], equal_nan=True) for k in want) for want in accepted):
                        failures.append(f"{name}: wrong answer {got}")
                except Exception as err:  # noqa: BLE001 (a failed request is reported)
                    failures.append(f"{name}: {err!r}")
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    replaces = 0
    deadline = time.monotonic() + seconds
    with DeviceClient("127.0.0.1", port, timeout=60) as owner:
        while time.monotonic() < deadline:
            owner.upload_model("swap", swap_versions[replaces % 2]["dir"], force=True)
            replaces += 1
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return sum(counts), failures, replaces


def test_sixteen_clients_while_a_model_is_replaced(tmp_path, mlflow_models, two_versions):
    x, versions = two_versions
    steady_x = model_inputs(mlflow_models["tflite_cnn"], batch=1)
    cases = {
        "swap": (x, [{"y": v["y"]} for v in versions]),
        "steady": (steady_x, [local_outputs(mlflow_models["tflite_cnn"], steady_x)]),
    }
    process = ServerProcess(tmp_path / "store").start()
    try:
        with DeviceClient("127.0.0.1", process.port) as owner:
            owner.upload_model("steady", mlflow_models["tflite_cnn"])
            owner.upload_model("swap", versions[1]["dir"])
        warm_requests, warm_failures, _ = _load_phase(process.port, 1.5, cases, versions)
        rss_before = rss_bytes(process.process.pid)
        requests_done, failures, replaces = _load_phase(process.port, 4.0, cases, versions)
        rss_after = rss_bytes(process.process.pid)
        assert warm_failures == [] and failures == [], (warm_failures + failures)[:5]
        assert replaces >= 3 and requests_done >= 100
        growth = rss_after - rss_before
        print(
            f"\nload: {requests_done} requests, 0 failed, {replaces} replaces, server RSS "
            f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB ({growth / 2**20:+.1f} MiB)"
        )
        assert growth < 64 * 1024**2
        _assert_store_is_clean(tmp_path / "store")
    finally:
        process.stop()
