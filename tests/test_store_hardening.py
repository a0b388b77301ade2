"""The model store's third hardening round: digests that cover links, files changed on disk, probe
children that die with their server, a start-up that a hanging model does not hold hostage, and
per-name state only for names that exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import ArachneError, ModelNotFoundError
from arachne_mlflow.model.digest import files_digest, tree_digest, tree_files
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.archives import tar_bytes, tar_member
from tests.helpers.servers import ServerProcess, ThreadServer, free_port


# -- the digest -------------------------------------------------------------------------------------
def test_the_stored_digest_covers_links_and_equals_the_clients_without_them(tmp_path, mlflow_models):
    plain = mlflow_models["onnx_linear"]
    assert tree_digest(plain) == files_digest(plain, tree_files(plain))  # what a client compares against

    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("a.yaml", "b.yaml"):
        (linked / name).write_bytes((plain / "MLmodel").read_bytes())
    (linked / "MLmodel").symlink_to("a.yaml")
    before = tree_digest(linked)
    (linked / "MLmodel").unlink()
    (linked / "MLmodel").symlink_to("b.yaml")  # the same bytes behind it, another file the loader reads
    assert tree_digest(linked) != before
    (linked / "MLmodel").unlink()
    (linked / "MLmodel").write_bytes(b"a.yaml")  # a file whose content is the link's target
    assert tree_digest(linked) != before


# -- per-name state -----------------------------------------------------------------------------------
def _held_by_server_code(snapshot: tracemalloc.Snapshot) -> int:
    server = str(Path(ModelStore.__module__.replace(".", "/")).parent)
    return sum(stat.size for stat in snapshot.statistics("filename") if server in stat.traceback[0].filename)


@pytest.mark.slow
def test_requests_naming_unknown_models_keep_no_memory(tmp_path, mlflow_models):
    """Loads of 15,000 names that do not exist (each took the name's lock) leave nothing behind, and
    neither do requests over HTTP to every per-model route."""
    server = ThreadServer(tmp_path / "store", token="t0ken", grpc=False).start()
    store = server.dataplane.store
    try:
        with requests.Session() as http:
            http.headers.update({"Authorization": "Bearer t0ken"})

            def rounds(start: int, count: int) -> None:
                for i in range(start, start + count):
                    for operation in (store.load, store.unload, store.rollback, store.delete):
                        try:
                            operation(f"unknown-{i}")
                        except ModelNotFoundError:
                            pass
                for i in range(start, start + count // 100):
                    base = f"{server.url}/v2/models/nope-{i}"
                    for method, path in (("POST", "/infer"), ("GET", "/ready"), ("GET", "")):
                        assert http.request(method, base + path, data=b"{}").status_code == 404
                    repository = f"{server.url}/v2/repository/models/nope-{i}"
                    for action in ("/load", "/unload", "/rollback"):
                        assert http.post(repository + action, data=b"{}").status_code == 404

            rounds(0, 300)  # warm-up: caches, the first requests' allocations
            tracemalloc.start(1)
            try:
                before = _held_by_server_code(tracemalloc.take_snapshot())
                rounds(1000, 15_000)
                after = _held_by_server_code(tracemalloc.take_snapshot())
            finally:
                tracemalloc.stop()
        assert after - before < 64 * 1024, f"{(after - before) / 1024:.0f} KiB kept"
    finally:
        server.stop()


# -- processes: crashing and hanging libraries -----------------------------------------------------------
def _hanging_library(path: Path) -> Path:
    """A shared library whose constructor sleeps for ten minutes: a load that hangs."""
    source = path.with_suffix(".c")
    source.write_text("#include <unistd.h>\n__attribute__((constructor)) static void load(void) { sleep(600); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    return path


def _version_dir(store: Path, name: str, which: str = "served") -> Path:
    record = json.loads((store / name / "CURRENT.json").read_text())
    return store / name / (record if which == "served" else record["previous"])["version_dir"]


def _replace_file(path: Path, replacement: Path) -> None:
    """Change a stored file behind the server's back (a new inode, as an editor or a copy would)."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(replacement.read_bytes())
    os.replace(temporary, path)


def _put(server: ServerProcess, name: str, body: bytes) -> requests.Response:
    return requests.put(f"{server.url}/v2/repository/models/{name}", data=body, timeout=120)


@pytest.mark.slow
def test_a_reupload_that_differs_only_in_a_link_is_probed(tmp_path, mlflow_models):
    """MLmodel -> a.yaml, then the same files with MLmodel -> b.yaml, whose model aborts on load:
    refused (400) like the same upload under a new name, the server up, the first version serving."""
    tvm = mlflow_models["tvm_linear"]
    crashing = models.crashing_library(tmp_path / "crash.so")
    good = yaml.safe_load((tvm / "MLmodel").read_text())
    bad = json.loads(json.dumps(good))
    bad["flavors"]["arachne"]["model_file"] = "crash.so"
    files = [
        tar_member("a.yaml", yaml.safe_dump(good).encode()),
        tar_member("b.yaml", yaml.safe_dump(bad).encode()),
        tar_member("model.so", (tvm / "model.so").read_bytes()),
        tar_member("params.bin", (tvm / "params.bin").read_bytes()),
        tar_member("crash.so", crashing.read_bytes()),
    ]
    first = tar_bytes([*files, tar_member("MLmodel", kind=tarfile.SYMTYPE, linkname="a.yaml")])
    second = tar_bytes([*files, tar_member("MLmodel", kind=tarfile.SYMTYPE, linkname="b.yaml")])
    server = ServerProcess(tmp_path / "store").start()
    try:
        assert _put(server, "sym", first).status_code == 200
        with DeviceClient("127.0.0.1", server.port) as device:
            before = device.model_record("sym")
            for name in ("sym", "sym-new"):
                answer = _put(server, name, second)
                assert answer.status_code == 400, answer.text
                assert "crashed the runtime while loading (SIGABRT)" in answer.json()["error"]
            assert server.process.poll() is None
            assert device.model_record("sym") == before and device.model_record("sym-new") is None
            assert device.infer("sym", {"x": _x()})["y"].shape == (1, 3)
    finally:
        server.stop()


def _x():
    return np.ones((1, 4), np.float32)


@pytest.mark.slow
def test_files_changed_on_disk_since_they_loaded_are_probed_again(tmp_path, mlflow_models):
    """A rollback to, or a load after an unload of, a version whose library now aborts is refused,
    not loaded into the server (which stays up, the served version serving)."""
    crashing = models.crashing_library(tmp_path / "crash.so")
    store = tmp_path / "store"
    server = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            device.upload_model("back", mlflow_models["tvm_linear"])
            device.upload_model("back", mlflow_models["onnx_linear"])
            _replace_file(_version_dir(store, "back", "previous") / "model.so", crashing)
            with pytest.raises(ArachneError, match=r"crashed the runtime while loading \(SIGABRT\)") as caught:
                device.rollback_model("back")
            assert caught.value.status_code == 400 and server.process.poll() is None
            assert device.model_record("back")["runtime"] == "onnx"
            assert device.infer("back", {"x": _x()})["y"].shape == (1, 3)

            device.upload_model("again", mlflow_models["tvm_linear"])
            device.unload_model("again")
            _replace_file(_version_dir(store, "again") / "model.so", crashing)
            with pytest.raises(ArachneError, match=r"crashed the runtime while loading \(SIGABRT\)"):
                device.load_model("again")
            assert server.process.poll() is None
            record = device.model_record("again")
            assert record["state"] == "UNAVAILABLE" and "SIGABRT" in record["reason"]
            assert device.infer("back", {"x": _x()})["y"].shape == (1, 3)
    finally:
        server.stop()


def _probe_children(store: Path) -> list[int]:
    """Processes probing a model of `store` (a probe child's command line names the model's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"arachne_mlflow.server.probe" in command and any(str(store).encode() in part for part in command):
            found.append(int(entry.name))
    return found


def _gone(store: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _probe_children(store):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _spawn(store: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "arachne_mlflow.server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-store", str(store), "--log-level", "warning", "--graceful-timeout", "1"]
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


def _live_within(process: subprocess.Popen, port: int, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds and process.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not answer /v2/health/live within {seconds} s")


@pytest.mark.slow
def test_a_hanging_load_at_start_up_holds_nothing_hostage_and_dies_with_the_server(tmp_path, mlflow_models):
    """A stored model whose load hangs: the server answers health while its probe runs, a kill -9 of
    the server leaves no probe behind (three cycles), and SIGTERM stops it within seconds."""
    store = tmp_path / "store"
    server = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            device.upload_model("hangs", mlflow_models["tvm_linear"])
            device.upload_model("fine", mlflow_models["onnx_linear"])
    finally:
        server.stop()
    _replace_file(_version_dir(store, "hangs") / "model.so", _hanging_library(tmp_path / "hang.so"))

    for cycle in range(4):
        port = free_port()
        process = _spawn(store, port, tmp_path / "server.log")
        try:
            _live_within(process, port, 25)
            ready = requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
            assert ready.status_code == 503
            hangs = requests.get(f"http://127.0.0.1:{port}/v2/repository/models/hangs", timeout=5).json()
            assert hangs["state"] == "UNAVAILABLE" and "starting" in hangs["reason"]
            assert _probe_children(store), "the probe of the hanging model runs"
            if cycle < 3:
                process.kill()
                process.wait(10)
            else:
                process.terminate()
                started = time.monotonic()
                process.wait(15)
                assert time.monotonic() - started < 10
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert _gone(store, 10), f"probe children left after cycle {cycle}: {_probe_children(store)}"


# -- one smoke policy; uploads smoke-tested before they switch ----------------------------------------
def test_the_gate_and_the_pull_smoke_test_choose_the_same_inputs(tmp_path):
    from arachne_mlflow.deployments import gate
    from arachne_mlflow.flavors import onnx as arachne_onnx
    from arachne_mlflow.model.directory import read_model_dir
    from arachne_mlflow.model.smoke_policy import example_path
    from arachne_mlflow.server.pull.smoke import smoke_inputs

    cases = [(models.onnx_linear("N"), np.array([[1.5, -2.0, 0.25, 4.0]])), (models.onnx_linear("N"), None)]
    cases.append((models.onnx_lookup(), None))  # integer indices: zeros on both paths
    for i, (onnx_model, example) in enumerate(cases):
        arachne_onnx.save_model(onnx_model, tmp_path / str(i), input_example=example)
        model = read_model_dir(tmp_path / str(i))
        pulled = smoke_inputs(model.inputs, example_path(model))
        pushed = gate.smoke_of(model).inputs
        assert [spec.name for spec in model.inputs] == list(pushed)
        for value, spec in zip(pulled, model.inputs):
            np.testing.assert_array_equal(pushed[spec.name], value)
            assert value.dtype == spec.dtype


def test_an_upload_that_fails_its_smoke_inference_is_refused_before_it_switches(tmp_path, mlflow_models):
    from tests.helpers.model_dirs import runtime_details, write_model_dir

    spec = runtime_details("onnx", _onnx_file(tmp_path / "linear.onnx", models.onnx_linear("N")))
    broken = {
        "cannot answer": (models.onnx_reshape_fails(), "failed its smoke inference: .*Reshape"),
        "answers outside its signature": (models.onnx_wider_than_declared(), "broke the signature: output 'y'"),
    }
    server = ThreadServer(tmp_path / "store", grpc=False).start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            device.upload_model("m", mlflow_models["onnx_linear"])
            before = device.model_record("m")
            for i, (onnx_model, message) in enumerate(broken.values()):
                model_dir = write_model_dir(
                    tmp_path / f"bad{i}", "onnx", _onnx_file(tmp_path / f"{i}.onnx", onnx_model), spec
                )
                for name in ("m", "new"):
                    with pytest.raises(ArachneError, match=message) as caught:
                        device.upload_model(name, model_dir, force=True)
                    assert caught.value.status_code == 400
                assert device.model_record("m") == before and device.model_record("new") is None
            assert device.infer("m", {"x": _x()})["y"].shape == (1, 3)
        assert sorted(p.name for p in (tmp_path / "store" / "m").iterdir()) == [
            "CURRENT.json",
            before_dir(tmp_path / "store", "m"),
        ]
    finally:
        server.stop()


def before_dir(store: Path, name: str) -> str:
    return _version_dir(store, name).name


def _onnx_file(path: Path, onnx_model) -> Path:
    path.write_bytes(onnx_model.SerializeToString())
    return path
