"""The HTTP client against real servers: its API, its errors, uploads with progress, and TLS."""

from __future__ import annotations

import contextlib
import socket

import numpy as np
import pytest

from arachne_mlflow.client import DeviceClient, failures
from arachne_mlflow.errors import DeviceUnreachableError, InvalidInputError, ModelNotFoundError
from tests.helpers.servers import ServerProcess, free_port
from tests.helpers.tls import self_signed_cert

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("client") / "store").start()
    yield process
    process.stop()


def test_unreachable_server_names_host_and_port():
    port = free_port()
    with DeviceClient("127.0.0.1", port, timeout=2) as device:
        with pytest.raises(DeviceUnreachableError, match=f"127.0.0.1:{port} is unreachable") as caught:
            device.ready()
    assert caught.value.status_code == 503


@pytest.mark.parametrize("call", ["control", "infer"])
def test_unreachable_says_why_in_words(call):
    """Refused, or a connection that never opens: the cause in words, not urllib3's "Max retries
    exceeded ... (Caused by NewConnectionError(...))" chain; the device by its fleet name and address."""
    with socket.socket() as full:  # a listener that never accepts, its queue full: a connect hangs
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = []
        with contextlib.suppress(TimeoutError):
            for _ in range(4):
                queued.append(socket.create_connection(full.getsockname(), timeout=0.5))
        for port, reason in ((free_port(), "connection refused"), (full.getsockname()[1], "timed out connecting")):
            with DeviceClient("127.0.0.1", port, name="cam-1", connect_timeout=0.5, timeout=1) as device:
                with pytest.raises(DeviceUnreachableError) as caught:
                    device.infer("m", {"x": np.ones((1, 2), np.float32)}) if call == "infer" else device.ready()
            message = str(caught.value)
            assert message.startswith(f"device cam-1 (127.0.0.1:{port}) is unreachable: {reason}"), message
            assert not [bad for bad in ("Max retries", "Errno", "HTTPConnection", "Caused by") if bad in message]
        for connection in queued:
            connection.close()


def test_a_name_that_does_not_resolve_is_said_so():
    with pytest.raises(socket.gaierror) as caught:  # a real resolver error, made without the network
        socket.getaddrinfo("cam-1.local", 5051, flags=socket.AI_NUMERICHOST)
    assert failures.reason(caught.value).startswith("name not resolved")
    wrapped = failures.unreachable("device cam-1 (cam-1.local:5051)", OSError("wrapper"))
    assert str(wrapped) == "device cam-1 (cam-1.local:5051) is unreachable: wrapper"


def test_infer_times_out_on_a_server_that_never_answers():
    """The infer connection's timeout (kept by the kernel on Linux) ends a call the server never
    answers, as an unreachable-device error that says it timed out; the connection is dropped."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with DeviceClient("127.0.0.1", port, timeout=0.3) as device:
            with pytest.raises(
                DeviceUnreachableError, match=r"127.0.0.1:\d+ is unreachable: timed out waiting for an answer$"
            ):
                device.infer("tiny", {"x": np.ones((1, 16), np.float32)})
            assert not device._transport._idle


def test_client_api(server, mlflow_models, capsys):
    with DeviceClient("127.0.0.1", server.port) as device:
        assert device.upload_model(
            "two", mlflow_models["tflite_two_inputs"], provenance={"run_id": "abc"}, progress=True
        )
        assert "upload two" in capsys.readouterr().err
        assert device.model_ready("two") and not device.model_ready("absent")
        meta = device.model_metadata("two")["inputs"]
        names = [t["name"] for t in meta]
        a, b = (np.arange(2 * t["shape"][1], dtype=np.float32).reshape(2, -1) for t in meta)
        by_list = device.infer("two", [a, b])
        by_name = device.infer("two", dict(zip(names, [a, b])), binary=False)
        assert list(by_list) == list(by_name) and len(by_list) == 2
        for key in by_list:
            np.testing.assert_array_equal(by_list[key], by_name[key])
        only = list(by_list)[1]
        assert list(device.infer("two", [a, b], outputs=[only])) == [only]
        with pytest.raises(InvalidInputError, match="takes 2 inputs"):
            device.infer("two", [a])
        with pytest.raises(InvalidInputError, match="expected dtype float32"):
            device.infer("two", [a.astype(np.float64), b])
        with pytest.raises(ModelNotFoundError, match="no model 'absent'"):
            device.infer("absent", [a])
        device.unload_model("two")
        assert device.model_record("two")["state"] == "UNAVAILABLE"
        device.load_model("two")
        assert device.model_record("two") | {"state": "READY"} == device.model_record("two")
        device.delete_model("two")
        with pytest.raises(ModelNotFoundError):
            device.delete_model("two")
        for bad in ("a/b", "../x", "x?y=1"):
            with pytest.raises(InvalidInputError, match="invalid model name"):
                device.upload_model(bad, mlflow_models["onnx_linear"])


def test_tls_with_a_certificate_the_client_verifies(tmp_path, mlflow_models):
    cert, key = self_signed_cert(tmp_path)
    secured = ServerProcess(
        tmp_path / "store",
        token="t",
        ca_cert=str(cert),
        extra_args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
    ).start()
    try:
        with DeviceClient("127.0.0.1", secured.port, token="t", tls=True, ca_cert=cert) as device:
            assert device.upload_model("linear", mlflow_models["onnx_linear"])
            assert device.infer("linear", [np.ones((1, 4), np.float32)])["y"].shape == (1, 3)
        with DeviceClient("127.0.0.1", secured.port, token="t", tls=True) as untrusting:
            with pytest.raises(DeviceUnreachableError, match="TLS"):
                untrusting.repository_index()
    finally:
        secured.stop()


def test_infer_survives_a_closed_keep_alive_connection_and_large_tensors(server, mlflow_models):
    """The pooled infer connections: a connection the server closed is replaced, and a
    multi-megabyte body goes out in pieces yet arrives whole."""
    with DeviceClient("127.0.0.1", server.port) as device:
        device.upload_model("dyn", mlflow_models["tflite_cnn"])
        small = np.ones((1, 8, 8, 3), np.float32)
        first = device.infer("dyn", [small])
        [kept] = device._transport._idle
        for _ in range(5):
            device.infer("dyn", [small])
        assert list(device._transport._idle) == [kept]  # one connection, kept alive
        kept.sock.shutdown(2)  # as if the server had timed the idle connection out
        [output] = first
        np.testing.assert_array_equal(device.infer("dyn", [small])[output], first[output])
        big = np.random.default_rng(0).standard_normal((5000, 8, 8, 3)).astype(np.float32)  # 3.8 MB
        from arachne_mlflow import runtime

        with runtime.init("tflite", model_dir=str(mlflow_models["tflite_cnn"])) as local:
            np.testing.assert_array_equal(device.infer("dyn", [big])[output], local.infer([big])[0])
        device.delete_model("dyn")
