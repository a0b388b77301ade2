"""The model store in real server processes: TVM kept out of the serving process (memory, imports
counted), quarantine of a model that crashes at start-up, rollback under load and across a restart."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import ConflictError, InvalidInputError, ModelNotReadyError
from tests.helpers import models
from tests.helpers.servers import ServerProcess, rss_bytes
from tests.helpers.v2 import local_outputs, model_inputs

pytestmark = pytest.mark.slow

# Installed as sitecustomize in every process of a test that counts imports: a finder that notes
# (pid, command line) when a process imports `tvm` (executes it: looking it up is not importing it).
_IMPORT_WATCH = """
import os, sys

class _TvmImportWatch:
    def find_spec(self, name, path=None, target=None):
        if name != "tvm":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            with open(os.environ["ARACHNE_TEST_TVM_IMPORTS"], "a") as log:
                log.write(f"{os.getpid()} {' '.join(sys.argv)}\\n")
            execute(module)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _TvmImportWatch())
"""


@pytest.fixture
def tvm_imports(tmp_path, monkeypatch):
    """A function that lists `(pid, command line)` of every process started from now on that imported TVM."""
    hook = tmp_path / "import-watch"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_IMPORT_WATCH)
    log = tmp_path / "tvm-imports.log"
    log.touch()
    monkeypatch.setenv("ARACHNE_TEST_TVM_IMPORTS", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))

    def imports() -> list[tuple[int, str]]:
        return [(int(pid), command) for pid, command in (line.split(" ", 1) for line in log.read_text().splitlines())]

    return imports


def _maps_tvm(pid: int) -> bool:
    return "libtvm" in Path(f"/proc/{pid}/maps").read_text()


def _process(pid: int, command: str, server_pid: int) -> str:
    if pid == server_pid:
        return "server"
    return "probe child" if command.split()[0].endswith("server/probe.py") else command


def _deploy(device: DeviceClient, name: str, model_dir: Path, provenance: dict | None = None) -> dict:
    """What the deployments plugin does to push: ask what the device runs and holds, then upload."""
    device.server_metadata()
    device.model_record(name)
    device.upload_model(name, model_dir, provenance=provenance, force=True)
    return device.model_record(name)


def test_a_server_serving_onnx_never_maps_tvm_and_stays_small(tmp_path, mlflow_models, tvm_imports):
    server = ServerProcess(tmp_path / "store").start()
    pid = server.process.pid
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            runtimes = {r["name"]: r for r in device.server_metadata()["runtimes"]}
            assert runtimes["tvm"]["version"] and runtimes["tvm"]["devices"] == ["cpu"]  # listed by a child
            _deploy(device, "linear", mlflow_models["onnx_linear"], {"run_id": "r1"})
            x = model_inputs(mlflow_models["onnx_linear"], batch=1)
            want = local_outputs(mlflow_models["onnx_linear"], x)["y"]
            for _ in range(100):
                np.testing.assert_equal(device.infer("linear", x)["y"], want)
            device.server_metadata()
        rss = rss_bytes(pid)
        assert not _maps_tvm(pid)
        assert pid not in {p for p, _ in tvm_imports()}
        print(f"\none ONNX model pushed, 100 requests: server RSS {rss / 2**20:.0f} MiB, no libtvm mapped")
        assert rss < 120 * 2**20
    finally:
        server.stop()


def test_tvm_is_imported_only_by_what_loads_a_tvm_model(tmp_path, mlflow_models, tvm_imports):
    """Counted in every process: the device listing and ONNX deploys import TVM nowhere in the server;
    a TVM deploy imports it in its probe child (and the server, for its first TVM model); files that
    already loaded in the server, and rollbacks, are not probed again."""
    server = ServerProcess(tmp_path / "store").start()
    pid = server.process.pid

    def during(action) -> list[str]:
        before = len(tvm_imports())
        action()
        return [_process(p, command, pid) for p, command in tvm_imports()[before:]]

    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            device.server_metadata()  # waits for the child that lists TVM's devices at start-up
            start_up = tvm_imports()
            assert [_process(p, command, pid) for p, command in start_up] == ["probe child"]
            counts = {
                "deploy ONNX": during(lambda: _deploy(device, "linear", mlflow_models["onnx_linear"])),
                "deploy TVM, first in this server": during(lambda: _deploy(device, "tvm", mlflow_models["tvm_linear"])),
                "deploy TVM, new files": during(lambda: _deploy(device, "tvm", mlflow_models["tvm_two_io"])),
                "deploy TVM, files loaded before": during(
                    lambda: _deploy(device, "tvm", mlflow_models["tvm_two_io"], {"run_id": "again"})
                ),
                "deploy TVM, same files, new name": during(
                    lambda: _deploy(device, "tvm-2", mlflow_models["tvm_linear"])
                ),
                "rollback TVM": during(lambda: device.rollback_model("tvm")),
                "GET /v2": during(device.server_metadata),
            }
            assert device.infer("tvm", model_inputs(mlflow_models["tvm_two_io"], batch=1))
    finally:
        server.stop()
    print("\nTVM imports per step: " + json.dumps(counts))
    assert counts["deploy ONNX"] == []
    assert sorted(counts["deploy TVM, first in this server"]) == ["probe child", "server"]
    assert counts["deploy TVM, new files"] == ["probe child"]
    for step in ("deploy TVM, files loaded before", "deploy TVM, same files, new name", "rollback TVM", "GET /v2"):
        assert counts[step] == [], step


def test_a_model_whose_load_kills_the_process_is_quarantined_at_start_up(tmp_path, mlflow_models):
    store = tmp_path / "store"
    first = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", first.port) as device:
            for name in ("crash-a", "crash-b"):
                device.upload_model(name, mlflow_models["tvm_linear"])
            device.upload_model("linear", mlflow_models["onnx_linear"])
            device.upload_model("cnn", mlflow_models["tflite_cnn"])
    finally:
        first.stop()
    for name in ("crash-a", "crash-b"):  # the library now segfaults when loaded (a driver updated under it)
        version = json.loads((store / name / "CURRENT.json").read_text())["version_dir"]
        models.crashing_library(store / name / version / "model.so", how="segfault")
    second = ServerProcess(store).start()  # before: the server exited with 139 at every start
    try:
        with DeviceClient("127.0.0.1", second.port) as device:
            index = {m["name"]: m for m in device.repository_index()}
            for name in ("crash-a", "crash-b"):
                assert index[name]["state"] == "UNAVAILABLE"
                assert re.search(r"crashed the runtime while loading \(SIGSEGV\).*quarantined", index[name]["reason"])
                assert device.model_record(name)["reason"] == index[name]["reason"]
                with pytest.raises(ModelNotReadyError, match="SIGSEGV"):
                    device.infer(name, model_inputs(mlflow_models["tvm_linear"], batch=1))
            assert index["linear"]["state"] == index["cnn"]["state"] == "READY"
            for name, source in (("linear", "onnx_linear"), ("cnn", "tflite_cnn")):
                x = model_inputs(mlflow_models[source], batch=1)
                want = local_outputs(mlflow_models[source], x)
                got = device.infer(name, x)
                for key in want:
                    np.testing.assert_equal(got[key], want[key])
            metrics = device.metrics()
            assert 'arachne_model_ready{model="crash-a"} 0.0' in metrics
            assert 'arachne_model_ready{model="linear"} 1.0' in metrics
            with pytest.raises(InvalidInputError, match="SIGSEGV"):
                device.load_model("crash-a")  # loaded in a child first: the server stays up
            assert second.process.poll() is None
            device.upload_model("crash-a", mlflow_models["tvm_linear"], force=True)  # a replace works
            assert device.infer("crash-a", model_inputs(mlflow_models["tvm_linear"], batch=1))["y"].shape == (1, 3)
            device.delete_model("crash-b")  # and so does a delete
            assert device.model_record("crash-b") is None and not (store / "crash-b").exists()
            assert 'model="crash-b"' not in device.metrics()
    finally:
        second.stop()
    third = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", third.port) as device:
            assert {m["name"]: m["state"] for m in device.repository_index()} == dict.fromkeys(
                ["cnn", "crash-a", "linear"], "READY"
            )
    finally:
        third.stop()


def test_rollback_under_load_survives_a_restart_and_is_gone_after_delete(tmp_path, linear_versions):
    x, versions = linear_versions
    store = tmp_path / "store"
    server = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", server.port) as owner:
            owner.upload_model("m", versions[0]["dir"], provenance={"version": "1"})
            owner.upload_model("m", versions[1]["dir"], provenance={"version": "2"})
            failures, answered, stop = [], [], threading.Event()

            def predict():
                with DeviceClient("127.0.0.1", server.port) as own:
                    while not stop.is_set():
                        try:
                            y = own.infer("m", x)["y"]
                            if not any(np.array_equal(y, v["y"]) for v in versions[:2]):
                                failures.append(f"an output of neither version: {y}")
                            answered.append(time.monotonic())
                        except Exception as err:  # noqa: BLE001 (a failed request is reported)
                            failures.append(repr(err))

            threads = [threading.Thread(target=predict) for _ in range(4)]
            for thread in threads:
                thread.start()
            while not answered:
                time.sleep(0.01)
            rollbacks = []
            for _ in range(5):
                start = time.monotonic()
                record = owner.rollback_model("m")
                rollbacks.append((start, time.monotonic()))
                time.sleep(0.05)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            assert failures == []
            assert all(any(start < at < end for at in answered) for start, end in rollbacks)
            assert record["revision"] == 1 and record["provenance"] == {"version": "1"}
            assert record["previous"]["revision"] == 2 and record["previous"]["provenance"] == {"version": "2"}
            np.testing.assert_equal(owner.infer("m", x)["y"], versions[0]["y"])
            slowest = max(end - start for start, end in rollbacks)
    finally:
        server.stop()
    restarted = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", restarted.port) as owner:
            assert owner.model_record("m") == {**record, "state": "READY"}
            np.testing.assert_equal(owner.infer("m", x)["y"], versions[0]["y"])
            start = time.monotonic()
            assert owner.rollback_model("m")["revision"] == 2  # the kept version survived the restart
            after_restart = time.monotonic() - start
            np.testing.assert_equal(owner.infer("m", x)["y"], versions[1]["y"])
            owner.delete_model("m")
            with pytest.raises(InvalidInputError, match="not a JSON number"):  # before: a 500 that installed it
                owner.upload_model("m", versions[2]["dir"], provenance={"run": float("nan")})
            assert owner.model_record("m") is None and not (store / "m").exists()
            owner.upload_model("m", versions[2]["dir"])
            assert owner.model_record("m")["previous"] is None
            with pytest.raises(ConflictError, match="no previous version") as caught:
                owner.rollback_model("m")
            assert caught.value.status_code == 409
            assert requests.post(f"{restarted.url}/v2/repository/models/m/rollback", timeout=10).status_code == 409
            assert sorted(p.name for p in (store / "m").iterdir()) == [
                "CURRENT.json",
                json.loads((store / "m" / "CURRENT.json").read_text())["version_dir"],
            ]
    finally:
        restarted.stop()
    print(f"\nrollback: slowest of 5 under load {slowest:.3f} s; after a restart (probed first) {after_restart:.3f} s")
