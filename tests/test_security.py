"""Security of the device server: every route behind the token, hostile names and archives, the
upload cap enforced while the body streams in, TLS, and nothing written outside the model store.

Extends tests/test_server.py (hand-written route list, 8 hostile archives) and tests/test_client.py
(TLS with a self-signed certificate); reuses their helpers.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import select
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import DeviceUnreachableError, UnsafeArchiveError
from arachne_mlflow.model.archive import safe_extract
from tests.helpers.archives import hostile_archives, tar_bytes, tar_member
from tests.helpers.servers import ServerProcess
from tests.helpers.tls import self_signed_cert
from tests.helpers.v2 import BAD_REQUESTS, ROUTES, app_routes

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Names no route may accept; each is sent raw (http.client), so nothing normalizes `..` first.
HOSTILE_NAMES = [
    "..",
    ".",
    "a..b",
    "%2e%2e",
    "%2E%2E%2Fetc",
    "a%2Fb",
    "..%2F..%2Fetc",
    ".hidden",
    "-dash",
    "x" * 129,
    "x" * 5000,
    "%00",
    "a%00b",
    "a%20b",
    "%C3%BC",
    "a%5Cb",
    "con:1",
    "a*b",
    "%252e%252e",
]


def _raw(port, method, path, body=b"", headers=None, timeout=10):
    """One request exactly as written (http.client does not normalize the path)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory, mlflow_models):
    root = tmp_path_factory.mktemp("secured")
    process = ServerProcess(root / "store", token=TOKEN, extra_args=["--max-upload-mb", "1"]).start()
    with DeviceClient("127.0.0.1", process.port, token=TOKEN) as owner:
        owner.upload_model("linear", mlflow_models["onnx_linear"])
    yield process
    process.stop()


def _serves(process):
    with DeviceClient("127.0.0.1", process.port, token=process.token) as owner:
        return owner.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)


# -- authentication --------------------------------------------------------------------------


def test_every_registered_route_needs_the_token(secured, tmp_path):
    routes = app_routes(tmp_path)
    assert set(ROUTES) < set(routes)  # the enumeration finds at least what test_server lists by hand
    public = [(m, p) for m, p in routes if p.startswith("/v2/health/")]
    assert sorted(public) == [("GET", "/v2/health/live"), ("GET", "/v2/health/ready")]
    for method, path in routes:
        url = secured.url + path
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN[:-1]}"},
            {"X-Token": TOKEN},
        ):
            response = requests.request(method, url, headers=headers, data=b"{}", timeout=10)
            if (method, path) in public:
                assert response.status_code == 200, (method, path)
                continue
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert "bearer token" in response.json()["error"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
        # with the token the request reaches the route (whatever it then answers, it is not 401)
        assert requests.request(method, url, headers=AUTH, data=b"{}", timeout=10).status_code != 401
    assert _serves(secured)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/health/../repository/index",
        "/v2/health/live/../../repository/index",
        "/v2/health/..%2F..%2Fv2",
        "/v2/health%2F..%2F..%2Fv2",
        "//v2",
        "/v2/",
        "/V2",
        "/v2/health/../../metrics",
        "/v2/health/./../../v2",
    ],
)
def test_paths_that_look_public_do_not_bypass_the_token(secured, path):
    for method in ("GET", "POST", "PUT", "DELETE"):
        status, body = _raw(secured.port, method, path, b"{}")
        assert status in (401, 404, 405), (method, path, status, body[:200])


# -- names -----------------------------------------------------------------------------------


def test_hostile_model_names_on_every_model_route(secured, tmp_path):
    model_routes = [(m, p) for m, p in app_routes(tmp_path) if "/m" in p and "models/m" in p]
    assert len(model_routes) >= 12
    tried = 0
    for method, path in model_routes:
        for name in HOSTILE_NAMES:
            target = path.replace("models/m", f"models/{name}", 1)
            status, body = _raw(secured.port, method, target, b"{}", AUTH)
            tried += 1
            assert status in (400, 404, 405), (method, target, status, body[:200])
            if status != 405:
                assert json.loads(body)["error"]
    assert tried >= 12 * len(HOSTILE_NAMES)
    assert sorted(p.name for p in secured.store.iterdir()) == [".arachne-model-store", "linear"]
    assert _serves(secured)


# -- archives ----------------------------------------------------------------------------------


def _symlink(name, target):
    return tar_member(name, kind=tarfile.SYMTYPE, linkname=target)


def test_safe_extract_refuses_links_that_escape_through_later_links(tmp_path):
    """`a -> x/y/../..` points inside until `x -> .` and `y -> .` arrive; then it points two levels up."""
    archive = tar_bytes([_symlink("a", "x/y/../.."), _symlink("x", "."), _symlink("y", ".")])
    with pytest.raises(UnsafeArchiveError, match="'a' links outside"):
        safe_extract(io.BytesIO(archive), tmp_path / "dest")
    inside = tar_bytes([_symlink("a", "x/y/.."), _symlink("x", "sub"), tar_member("sub/y/f", b"ok")])
    assert "a" in safe_extract(io.BytesIO(inside), tmp_path / "ok")  # x/y/.. = sub: still inside


def _more_hostile_archives(good: dict[str, bytes]) -> dict[str, bytes]:
    """Cases beyond test_server's eight (which this file runs too)."""
    mlmodel, model = good["MLmodel"], good["model.onnx"]
    whole = [tar_member("MLmodel", mlmodel), tar_member("model.onnx", model)]
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tar:  # 8 MiB of zeros in a few KiB
        info = tarfile.TarInfo("model.onnx")
        info.size = 8 * 1024**2
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    huge = tarfile.TarInfo("model.onnx")
    huge.size = 1024**4  # declares a terabyte: refused at its header, before any byte is written
    return {
        "link chain escape": tar_bytes([_symlink("a", "x/y/../.."), _symlink("x", "."), _symlink("y", "."), *whole]),
        "symlink to dir then write through": tar_bytes([_symlink("d", "/tmp"), tar_member("d/arachne-escape", b"bad")]),
        "write through an inner link": tar_bytes([_symlink("d", "."), tar_member("d/../arachne-escape", b"bad")]),
        "hardlink absolute": tar_bytes([tar_member("h", kind=tarfile.LNKTYPE, linkname="/etc/passwd"), *whole]),
        "fifo": tar_bytes([*whole, tar_member("pipe", kind=tarfile.FIFOTYPE)]),
        "block device": tar_bytes([*whole, tar_member("disk", kind=tarfile.BLKTYPE)]),
        "absolute windows": tar_bytes([tar_member("C:/escape", b"bad"), *whole]),
        "gzip bomb": gz.getvalue(),
        "terabyte member": tar_bytes([(huge, None)])[:1024],
        "empty body": b"",
        "zeros": bytes(10240),
        "mlmodel not yaml": tar_bytes([tar_member("MLmodel", b"\xff\xfe{{{"), tar_member("model.onnx", model)]),
        "mlmodel bad signature": tar_bytes(
            [
                tar_member("MLmodel", mlmodel.replace(b"signature:", b"signature: {inputs: '{'}\nx:")),
                tar_member("model.onnx", model),
            ]
        ),
        "model file outside": tar_bytes(
            [
                tar_member("MLmodel", mlmodel.replace(b"model_file: model.onnx", b"model_file: ../../etc/passwd")),
                tar_member("model.onnx", model),
            ]
        ),
        "corrupt model file": tar_bytes(
            [tar_member("MLmodel", mlmodel), tar_member("model.onnx", b"\x08\x01garbage" * 64)]
        ),
    }


def _tree(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under `root` (but `skip`) with its size and modification time."""
    result = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        stat = path.lstat()
        result[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return result


def test_hostile_uploads_write_nothing_outside_the_store(tmp_path, mlflow_models, monkeypatch):
    sandbox, scratch = tmp_path / "sandbox", tmp_path / "tmpdir"
    sandbox.mkdir()
    scratch.mkdir()
    (sandbox / "sentinel").mkdir()
    (sandbox / "sentinel" / "keep.txt").write_text("keep me")
    monkeypatch.setenv("TMPDIR", str(scratch))  # where the server's temporary files would go
    process = ServerProcess(sandbox / "store", token=TOKEN, extra_args=["--max-upload-mb", "4"]).start()
    log = sandbox / f"server-{process.port}.log"
    try:
        with DeviceClient("127.0.0.1", process.port, token=TOKEN) as owner:
            owner.upload_model("linear", mlflow_models["onnx_linear"])
        good = {n: (mlflow_models["onnx_linear"] / n).read_bytes() for n in ("MLmodel", "model.onnx")}
        escapes = [Path("/tmp/arachne-escape"), sandbox / "escape", sandbox / "store" / "escape"]
        assert not any(p.exists() for p in escapes)
        before = _tree(sandbox, {sandbox / "store", log}), _tree(scratch, {scratch / ".ses"})
        cases = {**hostile_archives(mlflow_models), **_more_hostile_archives(good)}
        for case, body in cases.items():
            for name in ("linear", "fresh"):
                response = requests.put(
                    f"{process.url}/v2/repository/models/{name}", data=body, headers=AUTH, timeout=30
                )
                assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
                assert response.json()["error"], case
                assert _serves(process), case
        for case, (body, headers) in BAD_REQUESTS.items():
            response = requests.post(
                f"{process.url}/v2/models/linear/infer", data=body, timeout=30, headers={**headers, **AUTH}
            )
            assert response.status_code == 400, case
        # onnxruntime keeps a session id in $TMPDIR/.ses when it tries to load a model; nothing else may appear
        after = _tree(sandbox, {sandbox / "store", log}), _tree(scratch, {scratch / ".ses"})
        assert after[0] == before[0] and after[1] == before[1] == {}
        assert not any(p.exists() for p in escapes)
        assert (sandbox / "sentinel" / "keep.txt").read_text() == "keep me"
        store = sandbox / "store"
        assert sorted(p.name for p in store.iterdir()) == [".arachne-model-store", "linear"]
        current = json.loads((store / "linear" / "CURRENT.json").read_text())["version_dir"]
        assert sorted(p.name for p in (store / "linear").iterdir()) == ["CURRENT.json", current]
        assert sorted(p.name for p in (store / "linear" / current).iterdir()) == [
            "MLmodel",
            "model.onnx",
            "requirements.txt",
        ]
    finally:
        process.stop()
    assert len(cases) >= 23


# -- the upload cap ----------------------------------------------------------------------------


def _tar_stream(member_size: int):
    """An endless tar of `member_size`-byte files: a valid upload that only the cap can stop."""
    index = 0
    while True:
        info = tarfile.TarInfo(f"part-{index}.bin")
        info.size = member_size
        yield info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(member_size)
        index += 1


def _whole_response(data: bytes) -> bool:
    """Headers and the body their content-length announces have arrived."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


def test_upload_over_the_cap_is_refused_while_it_streams(secured):
    """1 MiB cap, 512 MiB announced: the server answers after reading a few MiB, long before the end."""
    announced = 512 * 1024**2
    sock = socket.create_connection(("127.0.0.1", secured.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sent, answer = 0, b""
    try:
        sock.sendall(
            (
                f"PUT /v2/repository/models/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Length: {announced}\r\n\r\n"
            ).encode()
        )
        for chunk in _tar_stream(64 * 1024 - 512):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            assert sent < 64 * 1024**2, "the server kept reading far past its 1 MiB cap"
        try:
            while not _whole_response(answer) and (data := sock.recv(65536)):
                answer += data
        except ConnectionResetError:
            pass  # the server closed with our unread bytes in its buffer: it stopped reading either way
    finally:
        sock.close()
    assert sent < announced // 8
    if answer:
        assert answer.split(b" ")[1] in (b"400", b"413"), answer[:300]
        assert b"exceeds the limit" in answer
    with DeviceClient("127.0.0.1", secured.port, token=TOKEN) as owner:
        assert owner.model_record("big") is None
    assert not (secured.store / "big").exists()
    assert _serves(secured)


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_refuses_the_wrong_ca_and_plain_http(tmp_path, mlflow_models):
    """test_client checks the right CA and the system CAs; here: another CA, and HTTP to the HTTPS port."""
    (tmp_path / "server").mkdir()
    (tmp_path / "other").mkdir()
    cert, key = self_signed_cert(tmp_path / "server")
    other_ca, _ = self_signed_cert(tmp_path / "other")
    process = ServerProcess(
        tmp_path / "store",
        token=TOKEN,
        ca_cert=str(cert),
        extra_args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
    ).start()
    try:
        with DeviceClient("127.0.0.1", process.port, token=TOKEN, tls=True, ca_cert=other_ca) as wrong:
            with pytest.raises(DeviceUnreachableError, match=f"TLS with the device server at 127.0.0.1:{process.port}"):
                wrong.repository_index()
        with DeviceClient("127.0.0.1", process.port, token=TOKEN, timeout=5) as plain:
            with pytest.raises(DeviceUnreachableError, match=f"127.0.0.1:{process.port}"):
                plain.repository_index()
        with DeviceClient("127.0.0.1", process.port, token="wrong", tls=True, ca_cert=cert) as intruder:
            with pytest.raises(Exception, match="HTTP 401"):
                intruder.repository_index()
        with DeviceClient("127.0.0.1", process.port, token=TOKEN, tls=True, ca_cert=cert) as owner:
            assert owner.upload_model("linear", mlflow_models["onnx_linear"])
            assert owner.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
    finally:
        process.stop()


@pytest.mark.parametrize(
    "options",
    [
        {"sess_options": {"optimized_model_filepath": "{out}/written.onnx"}},
        {"sess_options": {"enable_profiling": True, "profile_file_prefix": "{out}/profile"}},
        {"sess_options": {"session.optimized_model_external_initializers_file_name": "{out}/weights.bin"}},
        {"provider_options": [{"trt_engine_cache_path": "{out}"}]},
    ],
    ids=["optimized-model", "profiling", "config-entry", "provider-cache"],
)
def test_runtime_options_cannot_make_the_server_write_files(secured, mlflow_models, tmp_path, options):
    """onnxruntime writes where `optimized_model_filepath` or `profile_file_prefix` say: an upload may not set them."""
    import shutil

    import yaml

    out = tmp_path / "outside"
    out.mkdir()
    model = shutil.copytree(mlflow_models["onnx_linear"], tmp_path / "model")
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    mlmodel["flavors"]["arachne"]["runtime_options"] = json.loads(json.dumps(options).replace("{out}", str(out)))
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with DeviceClient("127.0.0.1", secured.port, token=TOKEN) as owner:
        for name in ("linear", "fresh"):
            with pytest.raises(Exception, match="may not set options that name files") as caught:
                owner.upload_model(name, model, force=True)
            assert caught.value.status_code == 400
        assert owner.model_record("fresh") is None
    assert list(out.iterdir()) == []
    assert _serves(secured)
