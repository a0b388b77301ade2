"""`runtime.init(..., rpc_info=...)`: the same module API, run on a device server, identical outputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import DeviceUnreachableError, InvalidInputError, UnauthorizedError
from arachne_mlflow.runtime.rpc_info import client_options
from tests.helpers.fleet import fleet_file
from tests.helpers.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("remote") / "store", token="tok").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def rpc_info(server):
    return {"host": "127.0.0.1", "port": server.port, "token": "tok"}


@pytest.fixture(scope="module")
def device(server):
    with DeviceClient("127.0.0.1", server.port, token="tok") as client:
        yield client


def _feed(module, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(tuple(batch if d == -1 else d for d in detail["shape"])).astype(detail["dtype"])
        for detail in module.get_input_details()
    ]


def _cases(onnx_two_io_file, tflite_two_inputs_file, tvm_linear, mlflow_models):
    return {
        "onnx": dict(runtime="onnx", model_file=str(onnx_two_io_file)),
        "tflite": dict(runtime="tflite", model_file=str(tflite_two_inputs_file), num_threads=1),
        "tvm": dict(
            runtime="tvm",
            model_file=str(tvm_linear["model_file"]),
            params_file=str(tvm_linear["params_file"]),
            model_spec=tvm_linear["model_spec"],
        ),
        "tvm-env-file": dict(
            runtime="tvm",
            model_file=str(tvm_linear["model_file"]),
            params_file=str(tvm_linear["params_file"]),
            env_file=str(tvm_linear["env_file"]),
        ),
        "mlflow-dir": dict(runtime="tflite", model_dir=str(mlflow_models["tflite_cnn"])),
    }


@pytest.mark.parametrize("case", ["onnx", "tflite", "tvm", "tvm-env-file", "mlflow-dir"])
def test_remote_equals_local(
    case, rpc_info, device, onnx_two_io_file, tflite_two_inputs_file, tvm_linear, mlflow_models
):
    kwargs = _cases(onnx_two_io_file, tflite_two_inputs_file, tvm_linear, mlflow_models)[case]
    with arachne_runtime.init(**kwargs) as local, arachne_runtime.init(**kwargs, rpc_info=rpc_info) as remote:
        assert remote.get_input_details() == local.get_input_details()
        assert remote.get_output_details() == local.get_output_details()
        assert remote.runtime_name == kwargs["runtime"] and remote.device == f"127.0.0.1:{rpc_info['port']}"
        batch = 3 if kwargs["runtime"] == "tflite" else 1
        feed = _feed(local, batch)
        for i, x in enumerate(feed):
            local.set_input(i, x)
            remote.set_input(local.get_input_details()[i]["name"], x)
        local.run()
        remote.run()
        for i in range(len(local.get_output_details())):
            np.testing.assert_equal(remote.get_output(i), local.get_output(i))
        for got, want in zip(remote.infer(_feed(local, batch, seed=1)), local.infer(_feed(local, batch, seed=1))):
            np.testing.assert_equal(got, want)
        assert remote.model_name in {m["name"] for m in device.repository_index()}
    assert not [m for m in device.repository_index() if m["name"].startswith("rpc-")]


def test_uploads_once_and_benchmarks_on_the_server(rpc_info, device, onnx_two_io_file):
    first = arachne_runtime.init("onnx", model_file=str(onnx_two_io_file), rpc_info=rpc_info)
    uploaded_at = device.model_record(first.model_name)["uploaded_at"]
    with arachne_runtime.init("onnx", model_file=str(onnx_two_io_file), rpc_info=rpc_info) as second:
        assert second.model_name == first.model_name
        assert device.model_record(first.model_name)["revision"] == 1
        assert device.model_record(first.model_name)["uploaded_at"] == uploaded_at
        result = second.benchmark(warmup=0, repeat=4)
        assert result["repeat"] == 4 and 0 < result["min"] <= result["max"]
        name = first.model_name
        x = _feed(second)
        expected = first.infer(x)
        first.done()  # removes the shared model: the second module uploads it again when next used
        assert device.model_record(name) is None
        for got, want in zip(second.infer(x), expected):
            np.testing.assert_equal(got, want)
        assert device.model_record(name)["state"] == "READY"
    assert device.model_record(name) is None
    with pytest.raises(InvalidInputError, match="is done"):
        second.infer(x)


def test_many_threads_share_one_remote_module(rpc_info, tflite_two_inputs_file):
    with (
        arachne_runtime.init("tflite", model_file=str(tflite_two_inputs_file), rpc_info=rpc_info) as remote,
        arachne_runtime.init("tflite", model_file=str(tflite_two_inputs_file)) as local,
    ):
        feeds = [_feed(local, batch=b, seed=b) for b in range(1, 5)]
        expected = [local.infer(f) for f in feeds]
        errors = []

        def worker():
            try:
                for _ in range(5):
                    for feed, want in zip(feeds, expected):
                        for got, w in zip(remote.infer(feed), want):
                            np.testing.assert_equal(got, w)
            except Exception as err:  # noqa: BLE001 (reported below)
                errors.append(err)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []


def test_rpc_errors(rpc_info, onnx_linear_file):
    with pytest.raises(InvalidInputError, match="'host' and 'port'"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info={"port": 5051})
    with pytest.raises(InvalidInputError, match="unknown rpc_info keys"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info={**rpc_info, "pot": 1})
    port = free_port()
    with pytest.raises(DeviceUnreachableError, match=f"127.0.0.1:{port}"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info={"host": "127.0.0.1", "port": port})
    with pytest.raises(InvalidInputError, match="cannot be sent to a device server"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info=rpc_info, sess_options=object())
    with pytest.raises(Exception, match="HTTP 401"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info={**rpc_info, "token": "bad"})


def test_remote_legacy_package(tmp_path, rpc_info, device, tvm_linear):
    import tarfile

    import yaml

    package = tmp_path / "pkg.tar"
    (tmp_path / "env.yaml").write_text(yaml.safe_dump({"model_spec": tvm_linear["model_spec"], "tvm_device": "cpu"}))
    with tarfile.open(package, "w") as tar:
        tar.add(tvm_linear["model_file"], "model.so")
        tar.add(tmp_path / "env.yaml", "env.yaml")
    kwargs = dict(package_tar=str(package), params_file=str(tvm_linear["params_file"]))
    x = [np.arange(4, dtype=np.float32).reshape(1, 4)]
    with (
        arachne_runtime.init("tvm", **kwargs) as local,
        arachne_runtime.init("tvm", rpc_info=rpc_info, **kwargs) as remote,
    ):
        np.testing.assert_equal(remote.infer(x)[0], local.infer(x)[0])
        name = remote.model_name
    assert device.model_record(name) is None


def test_the_token_comes_from_arachne_token_like_the_plugin(server, onnx_linear_file, monkeypatch, rng):
    """The README tour's step 6: `rpc_info={"host", "port"}` against a device started with --token."""
    address = {"host": "127.0.0.1", "port": server.port}
    monkeypatch.delenv("ARACHNE_TOKEN", raising=False)
    with pytest.raises(UnauthorizedError, match="ARACHNE_TOKEN"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info=address)
    monkeypatch.setenv("ARACHNE_TOKEN", "tok")
    x = rng.standard_normal((1, 4)).astype(np.float32)
    with arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info=address) as remote:
        assert remote.infer([x])[0].shape == (1, 3)


def test_a_fleet_device_by_name(server, onnx_linear_file, tmp_path, monkeypatch, rng):
    """`device` (or a `host` without a port) names a device of the fleet file: its address and token_env."""
    cam_0 = {"address": f"127.0.0.1:{server.port}", "token_env": "CAM_TOKEN"}
    fleet = fleet_file(tmp_path / "fleet.yaml", [], extra={"cam-0": cam_0, "cam-9": "127.0.0.1:9"})
    monkeypatch.setenv("ARACHNE_FLEET", str(fleet))
    monkeypatch.setenv("CAM_TOKEN", "tok")
    monkeypatch.setenv("ARACHNE_TOKEN", "not-this-one")
    x = rng.standard_normal((1, 4)).astype(np.float32)
    for rpc_info in ({"device": "cam-0"}, {"host": "cam-0"}):
        with arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info=rpc_info) as remote:
            assert remote.device == f"127.0.0.1:{server.port}" and remote.infer([x])[0].shape == (1, 3)
    with pytest.raises(InvalidInputError, match=r"no device 'cam-7' in fleet file .*'cam-0', 'cam-9'"):
        arachne_runtime.init("onnx", model_file=str(onnx_linear_file), rpc_info={"device": "cam-7"})
    assert client_options({"host": "jetson-1"})["port"] == 5051  # not a fleet device: the default port
    monkeypatch.setenv("ARACHNE_FLEET", str(tmp_path / "none.yaml"))
    with pytest.raises(InvalidInputError, match="fleet file .*none.yaml does not exist"):
        client_options({"device": "cam-0"})
