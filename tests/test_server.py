"""The device server as a real process on loopback: V2 over HTTP, all three runtimes, tritonclient."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from tests.helpers.archives import hostile_archives
from tests.helpers.servers import ServerProcess
from tests.helpers.v2 import local_outputs, model_inputs

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

MODELS = ["onnx_linear", "onnx_two_io", "tflite_cnn", "tflite_two_inputs", "tvm_linear", "tvm_two_io"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "store").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    with DeviceClient("127.0.0.1", server.port) as device:
        yield device


@pytest.fixture(scope="module")
def deployed(client, mlflow_models):
    for name in MODELS:
        assert client.upload_model(name, mlflow_models[name], provenance={"registered_model": name, "version": "3"})
    return mlflow_models


def _post_infer(server, name, body, headers=None):
    return requests.post(f"{server.url}/v2/models/{name}/infer", data=body, headers=headers or {}, timeout=30)


def test_health_and_server_metadata(client, server):
    assert client.live() and client.ready()
    meta = client.server_metadata()
    assert meta["name"] == "arachne-mlflow" and "binary_tensor_data" in meta["extensions"] and meta["arch"]
    runtimes = {r["name"]: r for r in meta["runtimes"]}
    assert {"onnx", "tflite", "tvm"} <= set(runtimes) and runtimes["onnx"]["library"] == "onnxruntime"
    assert all(runtimes[n]["version"] for n in ("onnx", "tflite", "tvm"))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_local(client, deployed, name, binary):
    inputs = model_inputs(deployed[name], batch=3 if name.startswith("tflite") else 1)
    expected = local_outputs(deployed[name], inputs)
    got = client.infer(name, inputs, binary=binary)
    assert list(got) == list(expected)
    for key in expected:
        if binary:
            np.testing.assert_equal(got[key], expected[key])
        else:  # JSON carries float32 as decimal text: exact after the round trip through float64
            np.testing.assert_array_equal(got[key], expected[key])


def test_model_metadata_and_info(client, deployed):
    meta = client.model_metadata("onnx_linear")
    assert meta["platform"] == "arachne_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]
    assert client.model_metadata("tflite_cnn")["inputs"][0]["shape"] == [-1, 8, 8, 3]
    info = client.model_record("tvm_linear")
    assert info["runtime"] == "tvm" and info["state"] == "READY" and info["digest"].startswith("sha256:")
    assert info["provenance"] == {"registered_model": "tvm_linear", "version": "3"}
    assert client.model_record("nope") is None
    assert {m["name"] for m in client.repository_index()} >= set(MODELS)


def test_tritonclient(server, deployed):
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata()["name"] == "arachne-mlflow"
    assert triton.is_model_ready("onnx_two_io")
    meta = triton.get_model_metadata("onnx_two_io")
    assert [t["name"] for t in meta["inputs"]] == ["a", "b"]
    feed = model_inputs(deployed["onnx_two_io"])
    expected = local_outputs(deployed["onnx_two_io"], feed)
    for binary in (True, False):
        inputs = []
        for name, array in feed.items():
            tensor = httpclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("scaled", "sum")]
        result = triton.infer("onnx_two_io", inputs, outputs=outputs)
        for name in ("sum", "scaled"):
            np.testing.assert_array_equal(result.as_numpy(name), expected[name])
    for compression in ("gzip", "deflate"):
        result = triton.infer(
            "onnx_two_io",
            inputs,
            model_version="1",
            request_compression_algorithm=compression,
            response_compression_algorithm=compression,
        )
        np.testing.assert_array_equal(result.as_numpy("sum"), expected["sum"])
    assert triton.is_model_ready("onnx_two_io", model_version="1")
    assert triton.get_model_metadata("onnx_two_io", model_version="1")["versions"] == ["1"]
    with pytest.raises(Exception, match="no version '7'"):
        triton.infer("onnx_two_io", inputs, model_version="7")
    everything = triton.infer("onnx_two_io", inputs)  # no outputs named: all of them, binary by default
    np.testing.assert_array_equal(everything.as_numpy("scaled"), expected["scaled"])
    triton.unload_model("tvm_two_io")
    assert not triton.is_model_ready("tvm_two_io")
    states = {m["name"]: m["state"] for m in triton.get_model_repository_index()}
    assert states["tvm_two_io"] == "UNAVAILABLE" and states["onnx_linear"] == "READY"
    with pytest.raises(Exception, match="not loaded"):
        triton.infer("tvm_two_io", inputs)
    triton.load_model("tvm_two_io")
    assert triton.is_model_ready("tvm_two_io")
    triton.close()


def test_upload_skip_replace_and_failed_replace(client, deployed, onnx_dynamic_file, tmp_path):
    from tests.helpers.model_dirs import runtime_details, write_model_dir

    assert not client.upload_model("onnx_linear", deployed["onnx_linear"])  # identical: skipped
    assert client.upload_model("swap", deployed["onnx_linear"])
    before = client.model_record("swap")
    x = model_inputs(deployed["onnx_linear"])
    first = client.infer("swap", x)["y"]
    dynamic = write_model_dir(tmp_path / "dyn", "onnx", onnx_dynamic_file, runtime_details("onnx", onnx_dynamic_file))
    assert client.upload_model("swap", dynamic)
    after = client.model_record("swap")
    assert after["revision"] == before["revision"] + 1 and after["digest"] != before["digest"]
    assert client.model_metadata("swap")["inputs"][0]["shape"] == [-1, 4]
    np.testing.assert_equal(client.infer("swap", {"x": np.tile(x["x"], (5, 1))})["y"], np.tile(first, (5, 1)))
    # a broken model file under the same name is refused and the served version stays
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    (broken / "MLmodel").write_text((dynamic / "MLmodel").read_text())
    with pytest.raises(Exception, match="cannot load") as caught:
        client.upload_model("swap", broken)
    assert caught.value.status_code == 400
    assert client.model_record("swap")["digest"] == after["digest"]
    np.testing.assert_equal(client.infer("swap", x)["y"], first)
    client.delete_model("swap")
    assert client.model_record("swap") is None


def test_replace_while_serving_loses_no_request(client, deployed):
    client.upload_model("busy", deployed["onnx_linear"])
    x = model_inputs(deployed["onnx_linear"])
    expected = local_outputs(deployed["onnx_linear"], x)["y"]
    failures, answered, stop = [], [], threading.Event()

    def hammer():
        with DeviceClient("127.0.0.1", client.port) as own:
            while not stop.is_set():
                try:
                    np.testing.assert_equal(own.infer("busy", x)["y"], expected)
                    answered.append(time.monotonic())
                except Exception as err:  # noqa: BLE001 (collected and reported below)
                    failures.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    while not answered:
        time.sleep(0.01)
    replaces = []
    for _ in range(3):
        start = time.monotonic()
        client.upload_model("busy", deployed["onnx_linear"], force=True)
        replaces.append((start, time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    assert client.model_record("busy")["revision"] == 4
    # requests were answered while each replace was under way, not only between them
    assert all(any(start < at < end for at in answered) for start, end in replaces)


def test_several_clients_at_once(server, deployed):
    names = ["onnx_two_io", "tflite_two_inputs", "tvm_linear", "tflite_cnn"]
    cases = {n: [model_inputs(deployed[n], batch=1, seed=s) for s in range(3)] for n in names}
    expected = {n: [local_outputs(deployed[n], x) for x in xs] for n, xs in cases.items()}
    errors = []

    def worker(index):
        name = names[index % len(names)]
        try:
            with DeviceClient("127.0.0.1", server.port) as own:
                for _ in range(5):
                    for x, want in zip(cases[name], expected[name]):
                        got = own.infer(name, x)
                        for key in want:
                            np.testing.assert_equal(got[key], want[key])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []


def test_benchmark_and_metrics(client, deployed):
    result = client.benchmark("tflite_cnn", warmup=1, repeat=3)
    assert result["repeat"] == 3 and result["min"] <= result["mean"] <= result["max"]
    client.infer("onnx_linear", model_inputs(deployed["onnx_linear"]))
    text = client.metrics()
    assert 'arachne_inference_requests_total{model="onnx_linear"}' in text
    assert 'arachne_model_load_seconds{model="tvm_linear"}' in text
    with pytest.raises(Exception, match="repeat"):
        client.benchmark("tflite_cnn", repeat=0)


def test_nan_and_inf_pass_through(client, deployed):
    x = np.array([[np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32)
    np.testing.assert_equal(
        client.infer("onnx_linear", {"x": x})["y"], local_outputs(deployed["onnx_linear"], {"x": x})["y"]
    )


def test_hostile_archives_are_refused(server, client, deployed, tmp_path):
    before = client.model_record("onnx_linear")
    for case, body in hostile_archives(deployed).items():
        for name in ("onnx_linear", "fresh-name"):
            response = requests.put(f"{server.url}/v2/repository/models/{name}", data=body, timeout=30)
            assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
            assert response.json()["error"], case
    assert client.model_record("fresh-name") is None
    assert client.model_record("onnx_linear")["digest"] == before["digest"]
    assert not (server.store.parent / "escape").exists()
    assert sorted(p.name for p in (server.store / "onnx_linear").iterdir()) == sorted(
        ["CURRENT.json", json.loads((server.store / "onnx_linear" / "CURRENT.json").read_text())["version_dir"]]
    )
    client.infer("onnx_linear", model_inputs(deployed["onnx_linear"]))


def test_token_and_caps_through_the_cli_and_tritonclient(tmp_path, mlflow_models):
    secured = ServerProcess(
        tmp_path / "store", token="s3cret", extra_args=["--max-upload-mb", "1", "--max-request-mb", "1"]
    ).start()
    try:
        assert requests.get(secured.url + "/v2/health/live", timeout=10).status_code == 200
        import tritonclient.http as httpclient

        triton = httpclient.InferenceServerClient(f"127.0.0.1:{secured.port}")
        assert triton.is_server_ready()
        with pytest.raises(Exception, match="bearer token"):
            triton.get_server_metadata()
        assert triton.get_server_metadata(headers={"Authorization": "Bearer s3cret"})["name"] == "arachne-mlflow"
        triton.close()
        assert requests.get(secured.url + "/v2/health/ready", timeout=10).status_code == 200
        with DeviceClient("127.0.0.1", secured.port, token="wrong") as intruder:
            with pytest.raises(Exception, match="HTTP 401"):
                intruder.repository_index()
        with DeviceClient("127.0.0.1", secured.port, token="s3cret") as owner:
            assert owner.upload_model("linear", mlflow_models["onnx_linear"])
            assert owner.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
            with pytest.raises(InvalidInputError, match="exceeds the limit of 1048576"):  # --max-request-mb
                owner.infer("linear", [np.ones((70_000, 4), np.float32)])
            zeros = gzip.compress(
                json.dumps(
                    {
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}],
                        "pad": " " * 2**21,
                    }
                ).encode()
            )
            response = requests.post(
                f"{secured.url}/v2/models/linear/infer",
                data=zeros,
                timeout=30,
                headers={"Authorization": "Bearer s3cret", "Content-Encoding": "gzip"},
            )
            assert len(zeros) < 64 * 1024 and response.status_code == 413
            assert "decompressed request body exceeds" in response.json()["error"]
            big = tmp_path / "big"
            big.mkdir()
            for name in ("MLmodel", "model.onnx"):
                (big / name).write_bytes((mlflow_models["onnx_linear"] / name).read_bytes())
            (big / "padding.bin").write_bytes(bytes(3 * 1024**2))
            with pytest.raises(Exception, match="exceeds the limit"):
                owner.upload_model("huge", big, files=["MLmodel", "model.onnx", "padding.bin"])
            assert owner.model_record("huge") is None
            bomb = io.BytesIO()  # 3 MiB of zeros in a few KiB of gzip
            with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
                tar.add(big / "MLmodel", "MLmodel")
                tar.add(big / "padding.bin", "model.onnx")
            response = requests.put(
                f"{secured.url}/v2/repository/models/bomb",
                data=bomb.getvalue(),
                timeout=30,
                headers={"Authorization": "Bearer s3cret"},
            )
            assert len(bomb.getvalue()) < 64 * 1024 and response.status_code == 400
            assert "exceeds the limit" in response.json()["error"]
            assert [m["name"] for m in owner.repository_index()] == ["linear"]
    finally:
        secured.stop()


def test_models_come_back_after_a_restart(tmp_path, mlflow_models):
    store = tmp_path / "store"
    first = ServerProcess(store).start()
    names = ["onnx_two_io", "tflite_cnn", "tvm_linear"]
    try:
        with DeviceClient("127.0.0.1", first.port) as device:
            for name in names:
                device.upload_model(name, mlflow_models[name])
            device.upload_model("tvm_linear", mlflow_models["tvm_linear"], force=True, provenance={"run_id": "r2"})
            before = {name: device.model_record(name) for name in names}
            x = model_inputs(mlflow_models["tflite_cnn"])
            expected = device.infer("tflite_cnn", x)
    finally:
        first.stop()
    (store / "tvm_linear" / ".incoming-v-crashed").mkdir()  # what a crash during an upload leaves
    (store / "half-uploaded").mkdir()
    second = ServerProcess(store, command=("arachne_mlflow.cli", "serve")).start()
    try:
        with DeviceClient("127.0.0.1", second.port) as device:
            assert {m["name"]: m["state"] for m in device.repository_index()} == dict.fromkeys(names, "READY")
            for name in names:
                assert device.model_record(name) == before[name]
            assert before["tvm_linear"]["revision"] == 2 and before["tvm_linear"]["provenance"] == {"run_id": "r2"}
            got = device.infer("tflite_cnn", x)
            for key in expected:
                np.testing.assert_equal(got[key], expected[key])
            assert not device.upload_model("tflite_cnn", mlflow_models["tflite_cnn"])
        assert not (store / "tvm_linear" / ".incoming-v-crashed").exists()
        assert not (store / "half-uploaded").exists()
    finally:
        second.stop()


def test_refuses_a_directory_that_is_not_a_model_store(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    done = subprocess.run(
        [sys.executable, "-m", "arachne_mlflow.server", "--model-store", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "is not a model store" in done.stderr
    assert "WITHOUT A TOKEN" in done.stderr  # the loud warning for a non-loopback bind without a token
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_server_client_and_remote_runtime_import_no_mlflow():
    code = (
        "import sys, arachne_mlflow.server.app, arachne_mlflow.server.main, arachne_mlflow.client, "
        "arachne_mlflow.runtime.remote; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_kill_during_an_upload_keeps_the_last_complete_version(tmp_path, mlflow_models):
    from arachne_mlflow.model.archive import stream_tar

    store = tmp_path / "store"
    server = ServerProcess(store).start()
    source = mlflow_models["tflite_cnn"]
    with DeviceClient("127.0.0.1", server.port) as device:
        device.upload_model("m", mlflow_models["onnx_linear"])
        before = device.model_record("m")
    sending, killed, outcome = threading.Event(), threading.Event(), []

    def body():
        for chunk in stream_tar(source, ["MLmodel", "model.tflite"]):
            yield chunk[: len(chunk) // 2]
            sending.set()
            killed.wait(30)  # the rest is sent only once the server is gone
            yield chunk[len(chunk) // 2 :]

    def upload():
        try:
            requests.put(f"{server.url}/v2/repository/models/m", data=body(), timeout=60)
        except requests.RequestException as err:
            outcome.append(err)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert sending.wait(30)
    deadline = time.monotonic() + 10
    while not list((store / "m").glob(".incoming-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((store / "m").glob(".incoming-*")), "the upload never reached the store"
    server.process.kill()
    server.process.wait()
    server.stop()
    killed.set()
    thread.join(timeout=30)
    assert outcome and isinstance(outcome[0], requests.ConnectionError)
    restarted = ServerProcess(store).start()
    try:
        with DeviceClient("127.0.0.1", restarted.port) as device:
            assert device.model_record("m") == before
            assert device.infer("m", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
        assert not list((store / "m").glob(".incoming-*"))
    finally:
        restarted.stop()


def test_models_this_machine_cannot_run_are_refused(client, deployed, tmp_path):
    import shutil

    import yaml

    foreign = shutil.copytree(deployed["tvm_linear"], tmp_path / "foreign")
    mlmodel = yaml.safe_load((foreign / "MLmodel").read_text())
    mlmodel["flavors"]["arachne"]["tvm"]["arch"] = "riscv64"
    (foreign / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(Exception, match="compiled by TVM for riscv64") as caught:
        client.upload_model("foreign", foreign)
    assert caught.value.status_code == 400
    garbage = shutil.copytree(deployed["tvm_linear"], tmp_path / "garbage")
    (garbage / "model.so").write_bytes(b"\x7fELF" + bytes(4096))
    with pytest.raises(Exception, match="cannot load") as caught:
        client.upload_model("garbage", garbage)
    assert caught.value.status_code == 400
    assert client.model_record("foreign") is None and client.model_record("garbage") is None
    assert client.ready() and client.infer("tvm_linear", model_inputs(deployed["tvm_linear"]))["y"].shape == (1, 3)


@pytest.mark.parametrize("info", ["[1, 2]", "{not json", '{"k": "' + "v" * 20_000 + '"}'])
def test_bad_model_info_header_is_refused(server, deployed, info):
    body = (deployed["onnx_linear"] / "MLmodel").read_bytes()
    response = requests.put(
        f"{server.url}/v2/repository/models/info-test", data=body, timeout=10, headers={"Arachne-Provenance": info}
    )
    assert response.status_code == 400 and "Arachne-Provenance" in response.json()["error"]
