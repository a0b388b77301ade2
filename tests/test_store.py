"""The model store in-process: option allow-lists, CPU names, provenance, a full disk, rollback, quarantine.

`ModelStore` and the app over it (Starlette's TestClient) in this process; the probes they start
are real child processes. What needs a server process of its own is in tests/test_store_server.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from starlette.testclient import TestClient

from arachne_mlflow.errors import ConflictError, IncompatibleModelError, InvalidInputError, ModelNotReadyError
from arachne_mlflow.model.arch import machine_arch, normalize_arch
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.runtime import RuntimeModule, get_runtime_class
from arachne_mlflow.server.app import create_app
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.archives import model_tar
from tests.helpers.model_dirs import scaled_linear

X = {"x": np.array([[0.5, 1.0, 1.5, 2.0]], np.float32)}


def _tar(model_dir: Path) -> io.BytesIO:
    return io.BytesIO(model_tar(model_dir))


def _with_options(source: Path, target: Path, options: dict) -> Path:
    directory = shutil.copytree(source, target)
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    mlmodel["flavors"]["arachne"]["runtime_options"] = options
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


def _infer(store: ModelStore, name: str) -> np.ndarray:
    with store.use(name) as loaded:
        return loaded.module.infer([X["x"]])[0]


@pytest.fixture(scope="module")
def versions(linear_versions):
    x, found = linear_versions
    assert np.array_equal(x["x"], X["x"])
    return found


@pytest.fixture
def store(tmp_path):
    opened = ModelStore(tmp_path / "store")
    opened.open()
    yield opened
    opened.close()


def _version_dirs(store: ModelStore, name: str) -> list[str]:
    return sorted(p.name for p in (store.root / name).iterdir())


# -- runtime options: an allow-list per backend ------------------------------------------------------

REFUSED = [
    ("onnx_linear", {"rpc_info": {"host": "203.0.113.7", "port": 80}}, "runtime_options.rpc_info"),
    ("onnx_linear", {"package_tar": "/etc/passwd"}, "runtime_options.package_tar"),
    ("onnx_linear", {"runtime": "tflite"}, "runtime_options.runtime"),
    ("onnx_linear", {"model_file": "/etc/passwd"}, "runtime_options.model_file"),
    ("onnx_linear", {"env_file": "/etc/passwd"}, "runtime_options.env_file"),
    ("onnx_linear", {"num_threads": 2}, "runtime_options.num_threads"),  # another backend's option
    ("onnx_linear", {"sess_options": {"logid": "x", "register_custom_ops_library": "/tmp/x.so"}}, "logid"),
    ("onnx_linear", {"sess_options": {"session.load_model_format": "ORT"}}, "session.load_model_format"),
    (
        "onnx_linear",
        {"providers": [["CUDAExecutionProvider", {"device_id": 0, "trt_engine_cache_path": "/tmp"}]]},
        "runtime_options.providers[0][1].trt_engine_cache_path",
    ),
    (
        "onnx_linear",
        {"providers": ["TensorrtExecutionProvider"], "provider_options": [{"trt_engine_decryption_lib_path": "x"}]},
        "runtime_options.provider_options[0].trt_engine_decryption_lib_path",
    ),
    ("tflite_cnn", {"rpc_info": {"host": "203.0.113.7", "port": 80}}, "runtime_options.rpc_info"),
    ("tflite_cnn", {"experimental_force_delegate_node_profiling": True}, "experimental_force_delegate_node_profiling"),
    ("tflite_cnn", {"providers": ["CPUExecutionProvider"]}, "runtime_options.providers"),
    ("tvm_linear", {"params_file": "/etc/passwd"}, "runtime_options.params_file"),
    ("tvm_linear", {"model_spec": {"inputs": [], "outputs": []}}, "runtime_options.model_spec"),
]


@pytest.mark.parametrize(("model", "options", "key"), REFUSED, ids=[f"{m}-{k}" for m, _, k in REFUSED])
def test_options_outside_the_backends_allow_list_are_refused_naming_the_key(
    store, mlflow_models, tmp_path, model, options, key
):
    directory = _with_options(mlflow_models[model], tmp_path / "model", options)
    with pytest.raises(InvalidInputError, match="may not set options that name files") as caught:
        store.put("hostile", _tar(directory))
    assert caught.value.status_code == 400 and key in str(caught.value)
    assert not (store.root / "hostile").exists() and store.index() == []


def test_wrong_types_of_allowed_options_are_refused(store, mlflow_models, tmp_path):
    for i, (model, options, message) in enumerate(
        [
            ("tflite_cnn", {"num_threads": "4"}, r"runtime_options.num_threads must be int, got str"),
            ("tflite_cnn", {"num_threads": True}, r"runtime_options.num_threads must be int, got bool"),
            ("onnx_linear", {"sess_options": {"intra_op_num_threads": [1]}}, r"intra_op_num_threads must be int"),
            ("onnx_linear", {"providers": [["CPUExecutionProvider", "x"]]}, r"providers\[0\]\[1\] must be dict"),
            ("onnx_linear", {"providers": [["CPUExecutionProvider"]]}, r"a provider name or a \[name, options\] pair"),
        ]
    ):
        directory = _with_options(mlflow_models[model], tmp_path / f"model-{i}", options)
        with pytest.raises(InvalidInputError, match=message):
            store.put("typed", _tar(directory))
    assert store.index() == []


def test_each_backends_own_options_are_accepted(store, mlflow_models, tmp_path):
    accepted = {
        "onnx_linear": {
            "providers": ["CPUExecutionProvider"],
            "sess_options": {
                "intra_op_num_threads": 1,
                "graph_optimization_level": "ORT_ENABLE_BASIC",
                "session.intra_op.allow_spinning": "0",
            },
        },
        "tflite_cnn": {"num_threads": 1, "experimental_op_resolver_type": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"},
        "tvm_linear": {"entry": "main"},
    }
    for model, options in accepted.items():
        directory = _with_options(mlflow_models[model], tmp_path / model, options)
        assert store.put(model, _tar(directory))["state"] == "READY"
    options = store.get("onnx_linear").module._session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_plugin_runtimes_allow_only_the_options_they_declare():
    plugin = get_runtime_class("simple")  # the example plugin (an entry point): it declares none
    assert plugin.server_options == {}
    with pytest.raises(InvalidInputError, match=r"runtime_options.level: .*the simple runtime allows: none"):
        plugin.check_server_options({"level": 3})
    plugin.check_server_options({})

    class Declares(RuntimeModule):
        server_options = {"level": int, "mode": (str, int)}

        def _infer(self, inputs):
            return inputs

    Declares.check_server_options({"level": 3, "mode": "fast"})
    with pytest.raises(InvalidInputError, match=r"runtime_options.path: .*allows: level, mode"):
        Declares.check_server_options({"level": 3, "path": "/etc"})
    with pytest.raises(InvalidInputError, match="runtime_options.level must be int"):
        Declares.check_server_options({"level": 3.5})


# -- CPU architecture names ----------------------------------------------------------------------------


def test_architecture_names_are_normalized_once():
    for names, canonical in (
        (["aarch64", "arm64", "ARM64", " arm64 "], "aarch64"),
        (["x86_64", "amd64", "AMD64", "x64"], "x86_64"),
        (["armv7l", "armhf", "armv7", "armv7hl"], "armv7l"),
        (["riscv64"], "riscv64"),
    ):
        assert {normalize_arch(name) for name in names} == {canonical}
    assert machine_arch() == normalize_arch(os.uname().machine)


def test_a_tvm_model_saved_for_arm64_runs_on_aarch64_devices_only(tvm_linear, tmp_path):
    from arachne_mlflow.deployments.converge import check_device_can_run
    from arachne_mlflow.deployments.source import ModelSource
    from arachne_mlflow.flavors import tvm as arachne_tvm

    path = tmp_path / "arm64-model"
    arachne_tvm.save_model(
        str(tvm_linear["model_file"]),
        path,
        params_file=tvm_linear["params_file"],
        model_spec=tvm_linear["model_spec"],
        arch="arm64",
    )
    assert yaml.safe_load((path / "MLmodel").read_text())["flavors"]["arachne"]["tvm"]["arch"] == "aarch64"
    # a model an older flavor (or another tool) wrote with macOS's name
    written = shutil.copytree(path, tmp_path / "written-arm64")
    mlmodel = yaml.safe_load((written / "MLmodel").read_text())
    mlmodel["flavors"]["arachne"]["tvm"]["arch"] = "arm64"
    (written / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    for directory in (path, written):
        model = read_model_dir(directory)
        source = ModelSource(model, model.files(), "sha256:x", 0, {})
        for device_arch in ("aarch64", "arm64"):
            metadata = {"arch": device_arch, "runtimes": [{"name": "tvm", "devices": ["cpu"]}]}
            check_device_can_run(metadata, source, "jetson:5051")
        with pytest.raises(IncompatibleModelError, match="device pc:5051 is x86_64 but the TVM model was compiled"):
            check_device_can_run({"arch": "x86_64", "runtimes": [{"name": "tvm"}]}, source, "pc:5051")
        if machine_arch() != "aarch64":
            with pytest.raises(IncompatibleModelError, match="compiled by TVM for"):
                model.check_compatible()


def test_the_server_reports_its_normalized_architecture(tmp_path):
    with TestClient(create_app(str(tmp_path / "store"))) as client:
        assert client.get("/v2").json()["arch"] == machine_arch()


# -- provenance ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        '{"run": NaN}',
        '{"run": Infinity}',
        '{"run": -Infinity}',
        '{"a": [1, 2, {"b": NaN}]}',
        '{"deep": ' + "[" * 9 + "1" + "]" * 9 + "}",
        '"just a string"',
    ],
    ids=["nan", "inf", "-inf", "nested-nan", "too-deep", "not-an-object"],
)
def test_bad_provenance_is_a_400_before_anything_is_written(tmp_path, mlflow_models, header):
    body = _tar(mlflow_models["onnx_linear"]).getvalue()
    with TestClient(create_app(str(tmp_path / "store"))) as client:
        response = client.put("/v2/repository/models/m", content=body, headers={"Arachne-Provenance": header})
        assert response.status_code == 400 and "Arachne-Provenance" in response.json()["error"]
        assert client.get("/v2/repository/models/m").status_code == 404
        assert client.post("/v2/repository/index").json() == []
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".arachne-model-store"]
        shallow = '{"deep": ' + "[" * 7 + "1" + "]" * 7 + ', "run": 1.5}'
        response = client.put("/v2/repository/models/m", content=body, headers={"Arachne-Provenance": shallow})
        assert response.status_code == 200, response.text
        assert client.get("/v2/repository/models/m").json()["provenance"] == json.loads(shallow)


def test_the_store_checks_provenance_itself(store, mlflow_models):
    for provenance in ({"run": float("nan")}, {"run": object()}, {1: "x"}, ["run"]):
        with pytest.raises(InvalidInputError, match="provenance"):
            store.put("m", _tar(mlflow_models["onnx_linear"]), provenance)
    assert not (store.root / "m").exists()


# -- a full disk -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (this test mounts it: it runs as root, as CI does)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    assert mounted.returncode == 0, f"this test mounts a tmpfs and needs root: {mounted.stderr}"
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def _free_pages(path: Path) -> int:
    return os.statvfs(path).f_bavail


def _pages(directory: Path) -> int:
    return sum(-(-(directory / n).stat().st_size // 4096) for n in read_model_dir(directory).files())


def test_a_full_disk_is_a_507_that_leaves_nothing_and_the_next_upload_that_fits_succeeds(
    small_disk, versions, tmp_path
):
    v1, v2 = versions[0]["dir"], versions[1]["dir"]
    big = scaled_linear(tmp_path / "big", 2.0, padding=256 * 1024)
    store_dir = small_disk / "store"
    with TestClient(create_app(str(store_dir))) as client:
        assert client.put("/v2/repository/models/m", content=_tar(v1).getvalue()).status_code == 200
        before = client.get("/v2/repository/models/m").json()
        # leave room for v2's files and two pages: its record with a 12 KiB provenance needs four
        filler = small_disk / "filler"
        filler.write_bytes(bytes((_free_pages(small_disk) - _pages(v2) - 2) * 4096))
        free = _free_pages(small_disk)
        provenance = json.dumps({"note": "x" * 12 * 1024})
        served_dir = json.loads((store_dir / "m" / "CURRENT.json").read_text())["version_dir"]
        for body, headers in ((_tar(v2), {"Arachne-Provenance": provenance}), (_tar(big), {})):
            response = client.put("/v2/repository/models/m", content=body.getvalue(), headers=headers)
            assert response.status_code == 507, response.text
            assert "storage is full" in response.json()["error"] and "'m' was not changed" in response.json()["error"]
            assert _free_pages(small_disk) == free  # everything of the failed upload is gone at once
            assert sorted(p.name for p in (store_dir / "m").iterdir()) == ["CURRENT.json", served_dir]
            assert client.get("/v2/repository/models/m").json() == before
            got = client.post("/v2/models/m/infer", json={"inputs": [_json_x()]}).json()
            np.testing.assert_allclose(got["outputs"][0]["data"], versions[0]["y"].ravel(), rtol=1e-6)
        response = client.put("/v2/repository/models/m", content=_tar(v2).getvalue())  # fits: small record
        assert response.status_code == 200, response.text
        assert response.json()["revision"] == 2 and response.json()["previous"]["revision"] == 1
        got = client.post("/v2/models/m/infer", json={"inputs": [_json_x()]}).json()
        np.testing.assert_allclose(got["outputs"][0]["data"], versions[1]["y"].ravel(), rtol=1e-6)


def _json_x() -> dict:
    return {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X["x"].ravel().tolist()}


# -- the previous version, and rollback ----------------------------------------------------------------


def test_rollback_serves_the_previous_version_and_swaps_back(store, versions):
    first = store.put("m", _tar(versions[0]["dir"]), {"registered_model": "m", "version": "1"})
    assert first["previous"] is None and first["bytes"] > 0
    second = store.put("m", _tar(versions[1]["dir"]), {"registered_model": "m", "version": "2"})
    assert second["previous"] == {key: first[key] for key in second["previous"]}
    assert set(second["previous"]) == {"revision", "runtime", "digest", "bytes", "uploaded_at", "provenance"}
    np.testing.assert_equal(_infer(store, "m"), versions[1]["y"])
    back = store.rollback("m")
    assert back["revision"] == 1 and back["digest"] == first["digest"] and back["provenance"]["version"] == "1"
    assert back["previous"]["revision"] == 2 and back["previous"]["digest"] == second["digest"]
    np.testing.assert_equal(_infer(store, "m"), versions[0]["y"])
    assert store.rollback("m")["revision"] == 2  # the served version was kept: rolling back again returns to it
    np.testing.assert_equal(_infer(store, "m"), versions[1]["y"])
    assert len(_version_dirs(store, "m")) == 3  # CURRENT.json and two versions


def test_rollback_without_a_previous_version_is_409(store, versions, tmp_path):
    store.put("m", _tar(versions[0]["dir"]))
    with pytest.raises(ConflictError, match="no previous version") as caught:
        store.rollback("m")
    assert caught.value.status_code == 409
    with TestClient(create_app(str(tmp_path / "http-store"))) as client:
        assert client.put("/v2/repository/models/m", content=_tar(versions[0]["dir"]).getvalue()).status_code == 200
        response = client.post("/v2/repository/models/m/rollback")
        assert response.status_code == 409 and "no previous version" in response.json()["error"]
        assert client.post("/v2/repository/models/nope/rollback").status_code == 404


def test_a_third_upload_drops_the_oldest_and_delete_drops_everything(store, versions):
    records = [store.put("m", _tar(v["dir"])) for v in versions]
    assert records[2]["revision"] == 3 and records[2]["previous"]["digest"] == records[1]["digest"]
    kept = json.loads((store.root / "m" / "CURRENT.json").read_text())
    assert _version_dirs(store, "m") == sorted(["CURRENT.json", kept["version_dir"], kept["previous"]["version_dir"]])
    store.rollback("m")
    np.testing.assert_equal(_infer(store, "m"), versions[1]["y"])
    again = store.put("m", _tar(versions[0]["dir"]))  # after a rollback: numbered past every kept revision
    assert again["revision"] == 4 and again["previous"]["revision"] == 2
    store.delete("m")
    assert not (store.root / "m").exists()
    assert store.put("m", _tar(versions[2]["dir"]))["previous"] is None
    with pytest.raises(ConflictError):
        store.rollback("m")


def test_a_failed_rollback_changes_nothing(tmp_path, versions):
    first = ModelStore(tmp_path / "store")
    first.open()
    first.put("m", _tar(versions[0]["dir"]))
    first.put("m", _tar(versions[1]["dir"]))
    first.close()
    previous_dir = json.loads((tmp_path / "store" / "m" / "CURRENT.json").read_text())["previous"]["version_dir"]
    (tmp_path / "store" / "m" / previous_dir / "model.onnx").write_bytes(b"no longer an onnx model")
    again = ModelStore(tmp_path / "store")
    again.open()
    try:
        record = again.record("m")
        with pytest.raises(InvalidInputError, match="cannot load"):
            again.rollback("m")  # after a restart the previous version is loaded in a child first
        assert again.record("m") == record
        np.testing.assert_equal(_infer(again, "m"), versions[1]["y"])
    finally:
        again.close()


def test_the_previous_version_survives_a_reopen_and_start_up_cleanup(tmp_path, versions):
    first = ModelStore(tmp_path / "store")
    first.open()
    first.put("m", _tar(versions[0]["dir"]))
    first.put("m", _tar(versions[1]["dir"]))
    record = first.record("m")
    first.close()
    (tmp_path / "store" / "m" / ".incoming-v-crashed").mkdir()  # what a crash during an upload leaves
    (tmp_path / "store" / "m" / ".CURRENT.json.1234abcd").write_text("{")
    again = ModelStore(tmp_path / "store")
    again.open()
    try:
        assert again.record("m") == record
        assert len(_version_dirs(again, "m")) == 3
        assert again.rollback("m")["revision"] == 1
        np.testing.assert_equal(_infer(again, "m"), versions[0]["y"])
    finally:
        again.close()


# -- start-up: a model that crashes its process is quarantined ---------------------------------------


def test_models_that_crash_their_process_at_start_up_are_quarantined(tmp_path, mlflow_models):
    """Three TVM models probed in one child: the crash of the second is pinned on it, the others load."""
    first = ModelStore(tmp_path / "store")
    first.open()
    for name in ("a-good", "b-crash", "c-good"):
        first.put(name, _tar(mlflow_models["tvm_linear"]))
    first.put("onnx", _tar(mlflow_models["onnx_linear"]))
    first.close()
    stored = json.loads((tmp_path / "store" / "b-crash" / "CURRENT.json").read_text())["version_dir"]
    models.crashing_library(tmp_path / "store" / "b-crash" / stored / "model.so", how="segfault")
    again = ModelStore(tmp_path / "store")
    again.open()
    try:
        states = {m["name"]: (m["state"], m["reason"]) for m in again.index()}
        assert states["b-crash"][0] == "UNAVAILABLE"
        assert "crashed the runtime while loading (SIGSEGV)" in states["b-crash"][1]
        assert "quarantined" in states["b-crash"][1]
        assert {name: state for name, (state, _) in states.items() if name != "b-crash"} == dict.fromkeys(
            ["a-good", "c-good", "onnx"], "READY"
        )
        with pytest.raises(ModelNotReadyError, match="SIGSEGV"):
            again.get("b-crash")
        with pytest.raises(InvalidInputError, match=r"crashed the runtime while loading \(SIGSEGV\)"):
            again.load("b-crash")  # loaded in a child first: still quarantined, this process still up
        assert again.put("b-crash", _tar(mlflow_models["tvm_linear"]))["state"] == "READY"  # a replace works
        again.delete("c-good")
        assert [m["name"] for m in again.index()] == ["a-good", "b-crash", "onnx"]
    finally:
        again.close()
