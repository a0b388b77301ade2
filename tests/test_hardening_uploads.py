"""Uploads an attacker builds: tar header bombs, hard links, YAML alias bombs, names the file
system refuses, ONNX external data outside the model, bodies the server should stop reading.

Each test sends its attack to a real device server process on loopback (or, where no network
is needed, to `safe_extract` and the ONNX check directly) and checks the bound: a 4xx at once,
nothing installed, the served model unchanged, the server's memory within its limit.
Python without `tarfile.data_filter` is checked on a real interpreter in tests/test_old_python.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import stat
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError, UnsafeArchiveError
from arachne_mlflow.model.archive import MAX_HEADER_BYTES, safe_extract
from arachne_mlflow.model.onnx_external import check_external_data
from tests.helpers import models
from tests.helpers.archives import tar_bytes, tar_member
from tests.helpers.model_dirs import external_data_model_dir
from tests.helpers.servers import ServerProcess

CAP_MB = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_models):
    process = ServerProcess(tmp_path_factory.mktemp("hardening") / "store", extra_args=["--max-upload-mb", str(CAP_MB)])
    process.start()
    with DeviceClient("127.0.0.1", process.port) as client:
        client.upload_model("linear", mlflow_models["onnx_linear"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def good(mlflow_models):
    """The files of a valid upload, by name."""
    return {name: (mlflow_models["onnx_linear"] / name).read_bytes() for name in ("MLmodel", "model.onnx")}


def _put(server, name, body, timeout=60):
    return requests.put(f"{server.url}/v2/repository/models/{name}", data=body, timeout=timeout)


def _assert_refused_and_nothing_installed(server, body, match):
    """For a new name and over the served model: a 4xx naming the problem, and nothing changed."""
    with DeviceClient("127.0.0.1", server.port) as client:
        before = client.model_record("linear")
        for name in ("fresh", "linear"):
            response = _put(server, name, body)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
            assert re.search(match, response.json()["error"]), response.json()["error"]
        assert client.model_record("fresh") is None
        assert client.model_record("linear")["digest"] == before["digest"]
        assert client.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
    assert not (server.store / "fresh").exists()
    current = json.loads((server.store / "linear" / "CURRENT.json").read_text())["version_dir"]
    assert sorted(p.name for p in (server.store / "linear").iterdir()) == ["CURRENT.json", current]


def _with_mlmodel(good, mlmodel: bytes, *extra):
    return tar_bytes([tar_member("MLmodel", mlmodel), tar_member("model.onnx", good["model.onnx"]), *extra])


def _symlink(name, target):
    return tar_member(name, kind=tarfile.SYMTYPE, linkname=target)


def _directory(name):
    return tar_member(name, kind=tarfile.DIRTYPE)


def _sparse(name):
    """A GNU sparse file entry (tarfile reads them; a model directory has no use for one)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    return tarfile.TarInfo.frombuf(info.tobuf(format=tarfile.GNU_FORMAT), "utf-8", "surrogateescape"), None


# -- 1. Python without tarfile.data_filter (3.11.2 on Debian 12) ------------------------------------


def test_extraction_needs_no_tarfile_data_filter_and_drops_special_bits(tmp_path, monkeypatch):
    """What the `data` filter does, done without it: no setuid/setgid/sticky, no world write, no ownership."""
    monkeypatch.delattr(tarfile, "data_filter")
    entries = []
    for name, mode in (("setuid", 0o6777), ("plain", 0o666), ("script", 0o744), ("private", 0o400)):
        info, data = tar_member(name, b"data")
        info.mode, info.uid, info.gid, info.uname = mode, 4242, 4242, "someone"
        entries.append((info, data))
    entries.append(_directory("sub"))
    safe_extract(io.BytesIO(tar_bytes(entries)), tmp_path / "out")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert modes == {"setuid": 0o755, "plain": 0o644, "script": 0o744, "private": 0o600}
    assert {p.stat().st_uid for p in (tmp_path / "out").iterdir()} == {os.getuid()}
    assert (tmp_path / "out" / "sub").is_dir()


# -- 9. YAML alias bomb ----------------------------------------------------------------------------


def _alias_bomb(levels=9, width=9):
    """Runtime options of `width ** levels` leaves in a few hundred bytes of YAML."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "{" + ", ".join(lines) + "}"


def test_yaml_alias_bomb_is_refused_at_once_and_uploads_go_on(server, good, mlflow_models):
    bomb = good["MLmodel"].replace(b"runtime_options: {}", b"runtime_options: " + _alias_bomb().encode())
    assert len(bomb) < 1500 and b"*l7" in bomb
    for _ in range(2):  # two of them once blocked every later upload
        _assert_refused_and_nothing_installed(server, _with_mlmodel(good, bomb), "once its aliases are expanded")
    with DeviceClient("127.0.0.1", server.port) as client:
        assert client.upload_model("other", mlflow_models["onnx_linear"])
        client.delete_model("other")


def test_yaml_aliases_as_mlflow_writes_them_are_accepted(server, good):
    """MLflow writes an alias where two flavors share an object (the pyfunc flavor's model_config)."""
    loader = b"loader_module: arachne_mlflow.pyfunc"
    mlmodel = (
        good["MLmodel"]
        .replace(b"runtime_options: {}", b"runtime_options: &id001\n      sess_options: {intra_op_num_threads: 1}")
        .replace(loader, loader + b"\n    model_config: *id001")
    )
    assert yaml.safe_load(mlmodel)["flavors"]["python_function"]["model_config"]["sess_options"]
    response = _put(server, "aliased", _with_mlmodel(good, mlmodel))
    assert response.status_code == 200, response.text
    assert requests.delete(f"{server.url}/v2/repository/models/aliased", timeout=30).status_code == 200


def test_negative_member_size_is_refused(tmp_path):
    info, _ = tar_member("f", b"")
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    head[124:136] = b"\xff" * 12  # base-256 size field: -1
    head[148:156] = b"%06o\0 " % (sum(head[:148]) + 8 * 32 + sum(head[156:]))
    with pytest.raises(UnsafeArchiveError, match="negative size"):
        safe_extract(io.BytesIO(bytes(head) + bytes(1024)), tmp_path / "out")


# -- 10. tar header bombs --------------------------------------------------------------------------


def _gzip_header_bomb(kind: bytes, declared: int, rest: bytes) -> bytes:
    """A gzip tar whose first extension header (PAX or GNU long name) declares `declared` bytes of zeros."""
    info = tarfile.TarInfo("././@PaxHeader" if kind == tarfile.XHDTYPE else "././@LongLink")
    info.type, info.size = kind, declared
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    out = [packer.compress(info.tobuf(format=tarfile.USTAR_FORMAT))]
    zeros = bytes(1 << 20)
    for _ in range(declared // len(zeros)):
        out.append(packer.compress(zeros))
    out.append(packer.compress(rest))
    out.append(packer.flush())
    return b"".join(out)


def _peak_rss(process) -> int:
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
def test_tar_header_bombs_stay_within_memory(tmp_path, mlflow_models, good):
    """256 MiB of PAX or GNU long-name header in a ~256 KiB gzip, cap 8 MiB: refused, server grows < 64 MiB."""
    process = ServerProcess(tmp_path / "store", extra_args=["--max-upload-mb", "8"]).start()
    try:
        with DeviceClient("127.0.0.1", process.port) as client:
            client.upload_model("linear", mlflow_models["onnx_linear"])  # everything an upload imports is loaded
            before = _peak_rss(process)
            for kind in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
                body = _gzip_header_bomb(kind, 256 * 1024**2, _with_mlmodel(good, good["MLmodel"]))
                assert len(body) < 1024**2
                response = _put(process, "bomb", body)
                assert response.status_code == 400, response.text[:300]
                assert "headers" in response.json()["error"] and str(MAX_HEADER_BYTES) in response.json()["error"]
            growth = _peak_rss(process) - before
            assert growth < 64 * 1024**2, f"the server grew by {growth / 1024**2:.0f} MiB"
            assert client.model_record("bomb") is None
            assert client.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
    finally:
        process.stop()


def test_decompressed_stream_is_capped_by_the_upload_cap(tmp_path):
    """Headers count too: 200 directories with 60 KiB of PAX records each unpack to 12 MiB of tar, cap 8 MiB."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for index in range(200):
            info = tarfile.TarInfo(f"d{index}")
            info.type, info.pax_headers = tarfile.DIRTYPE, {"comment": "x" * 60_000}
            tar.addfile(info)
    assert len(buffer.getvalue()) < 1024**2
    with pytest.raises(UnsafeArchiveError, match="exceeds the limit of 8388608 bytes once decompressed"):
        safe_extract(io.BytesIO(buffer.getvalue()), tmp_path / "out", max_bytes=8 * 1024**2)


def test_pax_global_headers_are_capped(tmp_path):
    """Global headers accumulate for the whole archive in tarfile: their total is capped, not each one."""
    safe_extract(io.BytesIO(_global_headers(1)), tmp_path / "one")
    with pytest.raises(UnsafeArchiveError, match="global headers exceed"):
        safe_extract(io.BytesIO(_global_headers(4)), tmp_path / "out")


def _global_headers(count):
    """`count` PAX global headers of 30 KB, each with a new key, each before one small file."""
    out = []
    for index in range(count):
        out.append(tarfile.TarInfo.create_pax_global_header({f"key{index}": "x" * 30_000}))
        info, data = tar_member(f"f{index}", b"x")
        out.append(info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(511))
    return b"".join(out) + bytes(1024)


# -- 11. hard links --------------------------------------------------------------------------------


def test_hard_links_are_refused(server, good):
    """One 8 MiB file and 1,000 hard links to it once cost 8 GiB of hashing."""
    links = [tar_member(f"link-{i}", kind=tarfile.LNKTYPE, linkname="weights.bin") for i in range(1000)]
    body = _with_mlmodel(good, good["MLmodel"], tar_member("weights.bin", bytes(8 * 1024**2)), *links)
    start = time.monotonic()
    _assert_refused_and_nothing_installed(server, body, "'link-0' is a hard link")
    assert time.monotonic() - start < 60  # a hang guard only


# -- 12. a refused upload is not read further ------------------------------------------------------


@pytest.mark.parametrize("case", ["not a tar", "member over the cap"])
def test_refused_upload_is_answered_at_once_and_the_connection_closed(server, case):
    """64 MiB announced, 64 KiB sent: the answer comes without the rest, and the server hangs up."""
    if case == "not a tar":
        first = b"this is not a tar archive " * 2600
    else:
        info = tarfile.TarInfo("model.onnx")
        info.size = (CAP_MB + 1) * 1024**2
        first = info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(64 * 1024 - 512)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(
            b"PUT /v2/repository/models/fresh HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n" + first[:65536]
        )
        readable, _, _ = select.select([sock], [], [], 15)
        assert readable, "no answer while the client waits: the server wants the rest of a body it refused"
        answer = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break  # closed with our unread bytes in its buffer
            if not data:
                break
            answer += data
        else:
            pytest.fail("the server kept the connection open after refusing the upload")
    finally:
        sock.close()
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.split(b" ")[1] in (b"400", b"413"), answer[:300]
    assert b"\r\nconnection: close" in head
    with DeviceClient("127.0.0.1", server.port) as client:
        assert client.model_record("fresh") is None
        assert client.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)


def test_accepted_upload_keeps_its_connection(server, mlflow_models, good):
    """A whole body read to its end is answered on a connection that stays open for the next request."""
    body = _with_mlmodel(good, good["MLmodel"])
    with requests.Session() as session:
        response = session.put(f"{server.url}/v2/repository/models/kept", data=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers.get("connection", "").lower() != "close"
        assert session.delete(f"{server.url}/v2/repository/models/kept", timeout=30).status_code == 200


# -- 14. archives and MLmodel files that are the client's fault ------------------------------------


def _deep_yaml(good):
    return good["MLmodel"].replace(b"runtime_options: {}", b"runtime_options: {a: " + b"[" * 5000 + b"]" * 5000 + b"}")


def _deep_json_signature(good):
    mlmodel = yaml.safe_load(good["MLmodel"])
    mlmodel["signature"]["inputs"] = "[" * 100_000 + "]" * 100_000
    return yaml.safe_dump(mlmodel).encode()


def _big_mlmodel(good):
    mlmodel = yaml.safe_load(good["MLmodel"])
    mlmodel["metadata"] = {"notes": "x" * (1024**2 + 1)}
    return yaml.safe_dump(mlmodel).encode()


CLIENT_ERRORS = {
    "symlink loop": (lambda g: _with_mlmodel(g, g["MLmodel"], _symlink("a", "b"), _symlink("b", "a")), "loop"),
    "write through a symlink loop": (
        lambda g: _with_mlmodel(g, g["MLmodel"], _symlink("a", "b"), _symlink("b", "a"), tar_member("a/x")),
        "loop|given twice",
    ),
    "name over 255 bytes": (lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("x" * 300)), "over 255 bytes"),
    "path over 4096 characters": (
        lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("d/" * 2100 + "f")),
        "name over 1024 bytes",
    ),
    "file, then a directory of that name": (
        lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("x"), _directory("x")),
        "both as a file and as a directory",
    ),
    "directory, then a file of that name": (
        lambda g: _with_mlmodel(g, g["MLmodel"], _directory("x"), tar_member("x")),
        "both as a file and as a directory",
    ),
    "file under a file": (
        lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("x"), tar_member("x/y")),
        "given twice|not a directory",
    ),
    "file under a file, deeper": (
        lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("x"), tar_member("x/y/z")),
        "is a file, not a directory",
    ),
    "same file twice": (lambda g: _with_mlmodel(g, g["MLmodel"], tar_member("x"), tar_member("x")), "given twice"),
    "dangling symlink": (lambda g: _with_mlmodel(g, g["MLmodel"], _symlink("a", "missing")), "links to nothing"),
    "sparse file": (lambda g: _with_mlmodel(g, g["MLmodel"], _sparse("holes")), "sparse file"),
    "deeply nested YAML": (lambda g: _with_mlmodel(g, _deep_yaml(g)), "nested deeper than 32"),
    "deeply nested JSON signature": (
        lambda g: _with_mlmodel(g, _deep_json_signature(g)),
        "'signature' is not a list of tensor specs",
    ),
    "MLmodel over 1 MiB": (lambda g: _with_mlmodel(g, _big_mlmodel(g)), "larger than 1048576 bytes"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_ERRORS))
def test_client_errors_are_4xx_and_install_nothing(server, good, case):
    build, match = CLIENT_ERRORS[case]
    _assert_refused_and_nothing_installed(server, build(good), match)


# -- 8. ONNX external data outside the model directory ---------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_onnx_external_data_outside_the_model_is_refused(server, tmp_path, mlflow_models, where):
    """The server refuses by itself, whatever onnxruntime would do (1.17-1.23 read the file)."""
    secret = tmp_path / "secret.bin"
    location = str(secret) if where == "absolute" else "../secret.bin"
    model = external_data_model_dir(tmp_path / "model", mlflow_models["onnx_linear"], location, secret)
    with DeviceClient("127.0.0.1", server.port) as client:
        before = client.model_record("linear")
        for name in ("fresh", "linear"):
            with pytest.raises(InvalidInputError, match="outside the model's directory") as caught:
                client.upload_model(name, model)
            assert caught.value.status_code == 400 and "'W'" in str(caught.value)
        assert client.model_record("fresh") is None
        assert client.model_record("linear")["digest"] == before["digest"]


def test_onnx_external_data_inside_the_model_is_served(server, tmp_path, mlflow_models):
    model = external_data_model_dir(
        tmp_path / "model", mlflow_models["onnx_linear"], "weights.bin", tmp_path / "model-weights.bin"
    )
    (model / "weights.bin").write_bytes((tmp_path / "model-weights.bin").read_bytes())
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    with DeviceClient("127.0.0.1", server.port) as client:
        assert client.upload_model("external", model)
        expected = client.infer("linear", [x])["y"]
        np.testing.assert_allclose(client.infer("external", [x])["y"], expected, rtol=1e-6)
        client.delete_model("external")


def test_onnx_external_data_check_finds_every_tensor(tmp_path):
    """Initializers, constants in node attributes, subgraphs and sparse tensors; bad protobuf is refused."""
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    def external(name, location):
        tensor = numpy_helper.from_array(np.ones(3, np.float32), name)
        external_data_helper.set_external_data(tensor, location, offset=0, length=12)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        return tensor

    def model_with(location, place):
        constant = helper.make_node("Constant", [], ["c"], value=external("C", location))
        inner = helper.make_graph([constant], "inner", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
        if place == "subgraph":
            nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)]
            initializers, sparse = [], []
        elif place == "sparse":
            nodes, initializers = [helper.make_node("Identity", ["cond"], ["y"])], []
            indices = numpy_helper.from_array(np.array([0], np.int64), "I")
            sparse = [helper.make_sparse_tensor(external("S", location), indices, [3])]
        else:
            nodes, initializers, sparse = [helper.make_node("Identity", ["cond"], ["y"])], [external("W", location)], []
        graph = helper.make_graph(
            nodes,
            "outer",
            [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
            initializers,
            sparse_initializer=sparse,
        )
        path = tmp_path / f"{place}.onnx"
        path.write_bytes(helper.make_model(graph).SerializeToString())
        return path

    for place in ("initializer", "subgraph", "sparse"):
        check_external_data(model_with("weights/w.bin", place))
        for bad in ("../w.bin", "/etc/passwd", "a/../../w.bin", "C:/w.bin", "a\\..\\w.bin"):
            with pytest.raises(InvalidInputError, match="outside the model's directory"):
                check_external_data(model_with(bad, place))
    check_external_data(models.onnx_linear(1).SerializeToString())
    with pytest.raises(InvalidInputError, match="not a valid ONNX file"):
        check_external_data(b"\x08\x01garbage" * 64)
