"""The gRPC service (`inference.GRPCInferenceService`) with tritonclient.grpc, sync and aio, on loopback.

The server runs in a thread of the test process (uvicorn with the gRPC server on its loop, as
`serve --grpc-port` runs it); one test starts the real command line with TLS.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.grpc import inference_pb2
from arachne_mlflow.server.dataplane import Dataplane
from arachne_mlflow.server.grpc_service import GrpcServer
from arachne_mlflow.server.store import ModelStore
from tests.helpers.servers import ServerProcess, ThreadServer, free_port
from tests.helpers.tls import self_signed_cert
from tests.helpers.v2 import local_outputs, model_inputs

pytestmark = pytest.mark.slow  # real sockets and uploads (each probed in a child process)

TOKEN = "grpc-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_REQUEST = 1 << 20
MODELS = ["onnx_linear", "onnx_two_io", "tflite_two_inputs"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_models):
    running = ThreadServer(tmp_path_factory.mktemp("grpc") / "store", token=TOKEN, max_request_bytes=MAX_REQUEST)
    yield running.start().deploy({name: mlflow_models[name] for name in MODELS})
    running.stop()


@pytest.fixture
def triton(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def _inputs(feed: dict[str, np.ndarray], module=grpcclient) -> list:
    tensors = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _rest(server, method: str, path: str, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return requests.request(method, server.url + path, headers=headers, timeout=30, **kwargs)


def test_health_and_metadata_are_those_of_rest(server, triton):
    assert triton.is_server_live() and triton.is_server_ready()  # no token needed, as /v2/health/*
    meta = triton.get_server_metadata(headers=AUTH, as_json=True)
    rest = _rest(server, "GET", "/v2").json()
    assert meta["name"] == rest["name"] == "arachne-mlflow" and meta["extensions"] == rest["extensions"]
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(meta["extensions"])
    model = triton.get_model_metadata("onnx_two_io", headers=AUTH)
    expected = _rest(server, "GET", "/v2/models/onnx_two_io").json()
    assert model.name == "onnx_two_io" and list(model.versions) == expected["versions"]
    assert model.platform == "arachne_onnx"
    got = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.inputs]
    assert got == expected["inputs"]
    assert triton.get_model_metadata("onnx_two_io", model_version="1", headers=AUTH).name == "onnx_two_io"


def test_model_ready_says_false_rather_than_failing(triton):
    assert triton.is_model_ready("onnx_linear", headers=AUTH)
    assert triton.is_model_ready("onnx_linear", model_version="1", headers=AUTH)
    assert not triton.is_model_ready("onnx_linear", model_version="7", headers=AUTH)
    assert not triton.is_model_ready("no_such_model", headers=AUTH)


@pytest.mark.parametrize("name", ["onnx_two_io", "tflite_two_inputs"])
def test_infer_with_raw_contents_equals_local(triton, mlflow_models, name):
    feed = model_inputs(mlflow_models[name], batch=1 if name.startswith("onnx") else 3)
    expected = local_outputs(mlflow_models[name], feed)
    result = triton.infer(name, _inputs(feed), headers=AUTH, request_id="req-7")
    response = result.get_response()
    assert response.id == "req-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == list(expected)
    assert len(response.raw_output_contents) == len(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(result.as_numpy(key), value)
    # outputs asked for: only those, in the order asked
    last = list(expected)[-1]
    picked = triton.infer(name, _inputs(feed), outputs=[grpcclient.InferRequestedOutput(last)], headers=AUTH)
    assert [o.name for o in picked.get_response().outputs] == [last]
    np.testing.assert_array_equal(picked.as_numpy(last), expected[last])


def test_typed_contents_as_kserve_sends_them(server, mlflow_models):
    """KServe's client sends list data in typed `contents` (no raw bytes); Triton's own messages here."""
    feed = model_inputs(mlflow_models["onnx_two_io"])
    expected = local_outputs(mlflow_models["onnx_two_io"], feed)
    request = service_pb2.ModelInferRequest(model_name="onnx_two_io")
    for name, array in feed.items():
        tensor = request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        for output, raw in zip(response.outputs, response.raw_output_contents):
            got = np.frombuffer(raw, np.float32).reshape(output.shape)
            np.testing.assert_array_equal(got, expected[output.name])
        del request.inputs[1].contents.fp32_contents[-1]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 4 elements, fp32_contents has 3" in caught.value.details()


def test_repository_index_load_and_unload(server, triton, mlflow_models):
    index = triton.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {m["name"]: m["state"] for m in index} == dict.fromkeys(MODELS, "READY")
    feed = model_inputs(mlflow_models["onnx_linear"])
    triton.unload_model("onnx_linear", headers=AUTH)
    try:
        assert not triton.is_model_ready("onnx_linear", headers=AUTH)
        states = {m.name: m.state for m in triton.get_model_repository_index(headers=AUTH).models}
        assert states["onnx_linear"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="not loaded") as caught:
            triton.infer("onnx_linear", _inputs(feed), headers=AUTH)
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="not supported") as caught:
            triton.load_model("onnx_linear", config='{"max_batch_size": 8}', headers=AUTH)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        triton.load_model("onnx_linear", headers=AUTH)
    assert triton.is_model_ready("onnx_linear", headers=AUTH)
    # KServe's client puts the model name in field 1 of the load request (repository_name here)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(
            service_pb2.RepositoryModelUnloadRequest(repository_name="onnx_linear"), metadata=tuple(AUTH.items())
        )
        assert not triton.is_model_ready("onnx_linear", headers=AUTH)
        stub.RepositoryModelLoad(
            service_pb2.RepositoryModelLoadRequest(repository_name="onnx_linear"), metadata=tuple(AUTH.items())
        )
    assert triton.is_model_ready("onnx_linear", headers=AUTH)


@pytest.mark.parametrize(
    "headers",
    [None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}, {"authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong token", "no scheme", "other scheme"],
)
def test_every_rpc_but_health_needs_the_token(triton, headers):
    for call in (
        lambda: triton.get_server_metadata(headers=headers),
        lambda: triton.is_model_ready("onnx_linear", headers=headers),
        lambda: triton.get_model_repository_index(headers=headers),
        lambda: triton.unload_model("onnx_linear", headers=headers),
        lambda: triton.get_inference_statistics(headers=headers),
    ):
        with pytest.raises(InferenceServerException, match="bearer token") as caught:
            call()
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    assert triton.is_model_ready("onnx_linear", headers=AUTH)  # the unload above did not happen


def test_the_bearer_scheme_is_case_insensitive(server, triton):
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert triton.get_server_metadata(headers={"authorization": f"{scheme} {TOKEN}"}).name == "arachne-mlflow"
        rest = requests.get(server.url + "/v2", headers={"Authorization": f"{scheme} {TOKEN}"}, timeout=10)
        assert rest.status_code == 200


def test_errors_carry_the_status_and_message_of_rest(server, triton, mlflow_models):
    feed = model_inputs(mlflow_models["onnx_two_io"])
    bad_shape = {"a": feed["a"].reshape(4, 1), "b": feed["b"]}
    cases = [
        ("no_such_model", feed, None, "StatusCode.NOT_FOUND", 404),
        ("onnx_two_io", bad_shape, None, "StatusCode.INVALID_ARGUMENT", 400),
        ("onnx_two_io", {"a": feed["a"]}, None, "StatusCode.INVALID_ARGUMENT", 400),
        ("onnx_two_io", feed, "7", "StatusCode.NOT_FOUND", 404),
    ]
    for name, inputs, version, status, http_status in cases:
        with pytest.raises(InferenceServerException) as caught:
            triton.infer(name, _inputs(inputs), model_version=version or "", headers=AUTH)
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
        rest = _rest(
            server,
            "POST",
            path,
            json={
                "inputs": [
                    {"name": k, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
                    for k, v in inputs.items()
                ]
            },
        )
        assert (caught.value.status(), rest.status_code) == (status, http_status)
        assert caught.value.message() == rest.json()["error"]
    with pytest.raises(InferenceServerException, match="has no output 'nope'") as caught:
        triton.infer("onnx_two_io", _inputs(feed), outputs=[grpcclient.InferRequestedOutput("nope")], headers=AUTH)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    metrics = _rest(server, "GET", "/metrics").text
    assert re.search(r'arachne_grpc_errors_total\{code="NOT_FOUND"\} [1-9]', metrics)


def test_requests_over_the_size_limit_are_refused_even_compressed(server, triton):
    big = np.zeros((MAX_REQUEST // 16 + 1, 4), np.float32)  # just over the limit once serialized
    assert len(gzip.compress(big.tobytes())) < MAX_REQUEST // 100
    for compression in (None, "gzip"):
        with pytest.raises(InferenceServerException) as caught:
            triton.infer("onnx_linear", _inputs({"x": big}), headers=AUTH, compression_algorithm=compression)
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert triton.is_server_ready()


def test_raw_contents_must_match_the_inputs(server, mlflow_models):
    feed = model_inputs(mlflow_models["onnx_two_io"])
    request = service_pb2.ModelInferRequest(model_name="onnx_two_io")
    for name, array in feed.items():
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(feed["a"].tobytes())  # one blob for two inputs
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents has 1 entries for 2 inputs" in caught.value.details()
        request.raw_input_contents.append(feed["b"].tobytes()[:-4])  # a blob too short for its shape
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert "needs 16 bytes" in caught.value.details()
        del request.raw_input_contents[:]
        request.inputs[0].shape[:] = [1 << 20, 1 << 20]  # a hostile shape: refused before any allocation
        request.raw_input_contents.extend([b"\0" * 16, feed["b"].tobytes()])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_what_is_not_served_is_unimplemented(server, triton):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        for method in ("TraceSetting", "LogSettings"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", metadata=tuple(AUTH.items()))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_shared_memory_is_refused_clearly_while_off(triton, mlflow_models):
    """(tests/test_shared_memory.py has the extension on: `serve --shm-regions`)"""
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_shared_memory("region", 16)
    with pytest.raises(InferenceServerException, match="system shared memory is off on this server") as caught:
        triton.infer("onnx_linear", [tensor], headers=AUTH)
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"


def test_aio_client(server, mlflow_models):
    feed = model_inputs(mlflow_models["onnx_two_io"])
    expected = local_outputs(mlflow_models["onnx_two_io"], feed)

    async def scenario():
        client = aioclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert (await client.get_server_metadata(headers=AUTH)).name == "arachne-mlflow"
            assert (await client.get_model_metadata("onnx_two_io", headers=AUTH)).platform == "arachne_onnx"
            assert await client.is_model_ready("onnx_two_io", headers=AUTH)
            results = await asyncio.gather(
                *[client.infer("onnx_two_io", _inputs(feed, aioclient), headers=AUTH) for _ in range(16)]
            )
            for result in results:
                np.testing.assert_array_equal(result.as_numpy("scaled"), expected["scaled"])
            index = await client.get_model_repository_index(headers=AUTH, as_json=True)
            assert {m["name"] for m in index["models"]} == set(MODELS)
            await client.unload_model("onnx_two_io", headers=AUTH)
            assert not await client.is_model_ready("onnx_two_io", headers=AUTH)
            await client.load_model("onnx_two_io", headers=AUTH)
            assert await client.is_model_ready("onnx_two_io", headers=AUTH)
            with pytest.raises(InferenceServerException, match="bearer token"):
                await client.get_model_metadata("onnx_two_io")
        finally:
            await client.close()

    asyncio.run(scenario())


def test_committed_messages_match_the_proto():
    """The generated module is the .proto's (same messages, fields and numbers), made by the pinned tools."""
    proto_dir = Path(inference_pb2.__file__).parent
    text = re.sub(r"//.*", "", (proto_dir / "inference.proto").read_text())
    declared, blocks = {}, []  # blocks: the message each open brace is in (None: an enum or the service)
    for token in re.findall(r"message \w+ \{|oneof \w+ \{|(?:map<[^>]*>|\w+) \w+ = \d+;|\{|\}", text):
        if token.startswith("message "):
            blocks.append(token.split()[1])
            declared[blocks[-1]] = {}
        elif token.startswith("oneof "):  # its fields are the message's
            blocks.append(blocks[-1])
        elif token == "{":
            blocks.append(None)
        elif token == "}":
            blocks.pop()
        elif blocks and blocks[-1] is not None:
            field, number = re.search(r"(\w+) = (\d+);", token).groups()
            declared[blocks[-1]][field] = int(number)
    generated = {}

    def walk(descriptor):
        generated[descriptor.name] = {f.name: f.number for f in descriptor.fields}
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested)

    for descriptor in inference_pb2.DESCRIPTOR.message_types_by_name.values():
        walk(descriptor)
    assert generated == declared
    source = Path(inference_pb2.__file__).read_text()
    assert "_runtime_version.Domain.PUBLIC,\n    6,\n    31,\n    1," in source  # grpcio-tools 1.80.0's gencode


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dataplane = Dataplane(ModelStore(tmp_path / "store"))
        with pytest.raises(InvalidInputError, match=f"cannot serve gRPC on 127.0.0.1:{taken.getsockname()[1]}"):
            asyncio.run(GrpcServer.start(dataplane, "127.0.0.1", taken.getsockname()[1]))


def test_grpc_loads_only_with_a_grpc_port(tmp_path):
    code = (
        "import sys; from arachne_mlflow.server.app import create_app; "
        f"create_app({str(tmp_path / 'store')!r}); print('grpc' in sys.modules, 'google.protobuf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_serve_command_with_grpc_port_token_and_tls(tmp_path, mlflow_models):
    cert, key = self_signed_cert(tmp_path)
    grpc_port = free_port()
    process = ServerProcess(
        tmp_path / "store",
        token=TOKEN,
        extra_args=["--grpc-port", str(grpc_port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
        ca_cert=str(cert),
    ).start()
    try:
        with DeviceClient("127.0.0.1", process.port, token=TOKEN, tls=True, ca_cert=cert) as device:
            device.upload_model("onnx_linear", mlflow_models["onnx_linear"])
        feed = model_inputs(mlflow_models["onnx_linear"])
        secure = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(cert))
        result = secure.infer("onnx_linear", _inputs(feed), headers=AUTH)
        np.testing.assert_array_equal(result.as_numpy("y"), local_outputs(mlflow_models["onnx_linear"], feed)["y"])
        secure.close()
        plain = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_live(client_timeout=5)
        plain.close()
    finally:
        process.stop()
