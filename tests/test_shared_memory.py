"""System shared memory (Triton's extension) with the real tritonclient, HTTP and gRPC, against a real server.

Triton's example flows (simple_http_shm_client, simple_grpc_shm_client, simple_http_shm_string_client:
register, infer with inputs and outputs in regions, status, unregister) for numeric and BYTES
tensors; regions that cannot be used (unknown, out of bounds, removed or shrunk by their owner) get
clear errors and the server keeps serving; the token guards registration; keys are POSIX shared
memory names only; the caps hold; descriptors are closed on unregister and at shut-down.
"""

from __future__ import annotations

import os
import queue
import uuid

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient import utils
from tritonclient.grpc import service_pb2 as grpc_service_pb2
from tritonclient.utils import InferenceServerException

from arachne_mlflow import runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.server.shared_memory import SharedMemoryError, SharedMemoryForbiddenError, SharedMemoryRegistry
from tests.helpers import models
from tests.helpers.model_dirs import runtime_details, write_model_dir
from tests.helpers.servers import ThreadServer

TOKEN = "shm-token"
GRPC_AUTH = {"authorization": f"Bearer {TOKEN}"}


def auth():
    """REST headers with the token: a new dict each call (tritonclient.http adds its own headers to the one given)."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def shm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shm-models")
    dirs = {}
    built = {"two_io": models.onnx_two_in_two_out(), "strings": models.onnx_strings(), "rows": models.onnx_linear("N")}
    for name, model in built.items():
        path = root / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        dirs[name] = write_model_dir(root / name, "onnx", path, runtime_details("onnx", path))
    return dirs


@pytest.fixture(scope="module")
def server(tmp_path_factory, shm_models):
    running = ThreadServer(
        tmp_path_factory.mktemp("shm") / "store", token=TOKEN, shm_regions=8, shm_max_bytes=16 * 1024**2
    ).start()
    running.deploy(shm_models)
    yield running
    running.stop()


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.unregister_system_shared_memory(headers=auth())
    client.close()


@pytest.fixture
def grpc_client(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.unregister_system_shared_memory(headers=GRPC_AUTH)
    client.close()


@pytest.fixture
def regions():
    """Create regions with tritonclient's utilities; every one is destroyed after the test."""
    made = []

    def create(byte_size):
        key = f"/arachne-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, byte_size)
        made.append(handle)
        return key, handle

    yield create
    for handle in made:
        if handle._shm_key in shm.mapped_shared_memory_regions():
            shm.destroy_shared_memory_region(handle)


def _two_inputs():
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    b = np.full((1, 4), 2.0, np.float32)
    return a, b


def _expected(server, a, b):
    with server.dataplane.store.use("two_io") as loaded:
        return dict(zip(loaded.output_names, loaded.module.infer([a, b])))


def _open_descriptors(key):
    """Descriptors of this process open on the object (the client's own included: compare counts)."""
    target = "/dev/shm/" + key[1:]
    return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == target)


# -- Triton's example flows ----------------------------------------------------------------
def test_server_metadata_lists_the_extension(http, grpc_client):
    assert "system_shared_memory" in http.get_server_metadata(headers=auth())["extensions"]
    assert "system_shared_memory" in grpc_client.get_server_metadata(headers=GRPC_AUTH).extensions


def test_http_flow_numeric_inputs_and_outputs_in_regions(server, http, regions):
    """simple_http_shm_client: both inputs in one region (at offsets), both outputs in another."""
    a, b = _two_inputs()
    expected = _expected(server, a, b)
    in_key, in_handle = regions(a.nbytes + b.nbytes)
    out_key, out_handle = regions(16 + 8)
    shm.set_shared_memory_region(in_handle, [a, b])
    http.register_system_shared_memory("input_data", in_key, a.nbytes + b.nbytes, headers=auth())
    http.register_system_shared_memory("output_data", out_key, 24, headers=auth())

    inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("input_data", a.nbytes)
    inputs[1].set_shared_memory("input_data", b.nbytes, offset=a.nbytes)
    outputs = [httpclient.InferRequestedOutput("sum"), httpclient.InferRequestedOutput("scaled")]
    outputs[0].set_shared_memory("output_data", 16)
    outputs[1].set_shared_memory("output_data", 8, offset=16)
    result = http.infer("two_io", inputs, outputs=outputs, headers=auth())

    # As Triton answers: an output in a region names its datatype and shape, no data, no parameters
    # (Triton's C++ client reads `binary_data_size` from any output entry with parameters).
    assert result.get_response()["outputs"] == [
        {"name": "sum", "datatype": "FP32", "shape": [1, 4]},
        {"name": "scaled", "datatype": "FP32", "shape": [1, 2]},
    ]
    got_sum = shm.get_contents_as_numpy(out_handle, np.float32, [1, 4])
    got_scaled = shm.get_contents_as_numpy(out_handle, np.float32, [1, 2], offset=16)
    np.testing.assert_array_equal(got_sum, expected["sum"])
    np.testing.assert_allclose(got_scaled, expected["scaled"], rtol=1e-6)

    status = {r["name"]: r for r in http.get_system_shared_memory_status(headers=auth())}
    assert status["input_data"] == {"name": "input_data", "key": in_key, "offset": 0, "byte_size": 32}
    assert set(status) == {"input_data", "output_data"}
    http.unregister_system_shared_memory("input_data", headers=auth())
    assert [r["name"] for r in http.get_system_shared_memory_status(headers=auth())] == ["output_data"]


def test_http_mixes_region_and_binary_tensors(server, http, regions):
    a, b = _two_inputs()
    key, handle = regions(a.nbytes)
    shm.set_shared_memory_region(handle, [a])
    http.register_system_shared_memory("a_only", key, a.nbytes, headers=auth())
    inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("a_only", a.nbytes)
    inputs[1].set_data_from_numpy(b)
    result = http.infer("two_io", inputs, headers=auth())
    np.testing.assert_array_equal(result.as_numpy("sum"), _expected(server, a, b)["sum"])

    out_key, out_handle = regions(16)
    http.register_system_shared_memory("sum_out", out_key, 16, headers=auth())
    outputs = [httpclient.InferRequestedOutput("sum"), httpclient.InferRequestedOutput("scaled", binary_data=True)]
    outputs[0].set_shared_memory("sum_out", 16)
    result = http.infer("two_io", inputs, outputs=outputs, headers=auth())
    assert result.get_response()["outputs"] == [
        {"name": "sum", "datatype": "FP32", "shape": [1, 4]},
        {"name": "scaled", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
    ]
    np.testing.assert_allclose(result.as_numpy("scaled"), _expected(server, a, b)["scaled"], rtol=1e-6)
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(out_handle, np.float32, [1, 4]), _expected(server, a, b)["sum"]
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_region_requests_keep_the_sequence_refusal_and_classification(server, http, grpc_client, regions, protocol):
    """A request whose inputs are in a region is decoded by the shared memory codec: it refuses sequences
    and answers class counts like any other."""
    module, client, headers = (httpclient, http, auth()) if protocol == "http" else (grpcclient, grpc_client, GRPC_AUTH)
    a, b = _two_inputs()
    key, handle = regions(a.nbytes)
    shm.set_shared_memory_region(handle, [a])
    client.register_system_shared_memory("a_seq", key, a.nbytes, headers=headers)
    inputs = [module.InferInput("a", [1, 4], "FP32"), module.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("a_seq", a.nbytes)
    inputs[1].set_data_from_numpy(b)
    with pytest.raises(InferenceServerException, match="sequence batching is not supported"):
        client.infer("two_io", inputs, sequence_id=7, sequence_start=True, headers=headers)
    result = client.infer(
        "two_io", inputs, outputs=[module.InferRequestedOutput("sum", class_count=2)], headers=headers
    )
    total = _expected(server, a, b)["sum"].ravel()
    top = [entry.decode() if isinstance(entry, bytes) else entry for entry in result.as_numpy("sum").ravel()]
    assert [int(entry.split(":")[1]) for entry in top] == list(np.argsort(-total)[:2])


def test_an_output_is_not_both_in_a_region_and_classes(server, http, grpc_client, regions):
    """Triton refuses an output that names a region and asks for classes (tritonclient refuses to send
    it, so the request is built by hand); nothing is written to the region."""
    out_key, out_handle = regions(16)
    http.register_system_shared_memory("classes_out", out_key, 16, headers=auth())
    region = {"shared_memory_region": "classes_out", "shared_memory_byte_size": 16}
    a, b = (x.ravel().tolist() for x in _two_inputs())
    body = {
        "inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": d} for n, d in (("a", a), ("b", b))],
        "outputs": [{"name": "sum", "parameters": {**region, "classification": 2}}],
    }
    answer = requests.post(f"{server.url}/v2/models/two_io/infer", json=body, headers=auth(), timeout=30)
    assert answer.status_code == 400 and "can't set both 'shared_memory_region'" in answer.json()["error"]

    request = grpc_service_pb2.ModelInferRequest(model_name="two_io")
    for name, data in (("a", a), ("b", b)):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(data)
    output = request.outputs.add(name="sum")
    output.parameters["shared_memory_region"].string_param = "classes_out"
    output.parameters["shared_memory_byte_size"].int64_param = 16
    output.parameters["classification"].int64_param = 2
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=grpc_service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=grpc_service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=tuple(GRPC_AUTH.items()), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "can't set both 'shared_memory_region'" in caught.value.details()
    assert shm.get_contents_as_numpy(out_handle, np.uint8, [16]).tolist() == [0] * 16


def test_grpc_flow_numeric_inputs_and_outputs_in_regions(server, grpc_client, regions):
    """simple_grpc_shm_client."""
    a, b = _two_inputs()
    expected = _expected(server, a, b)
    in_key, in_handle = regions(a.nbytes + b.nbytes)
    out_key, out_handle = regions(24)
    shm.set_shared_memory_region(in_handle, [a, b])
    grpc_client.register_system_shared_memory("input_data", in_key, 32, headers=GRPC_AUTH)
    grpc_client.register_system_shared_memory("output_data", out_key, 24, headers=GRPC_AUTH)

    inputs = [grpcclient.InferInput("a", [1, 4], "FP32"), grpcclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("input_data", 16)
    inputs[1].set_shared_memory("input_data", 16, offset=16)
    outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("scaled")]
    outputs[0].set_shared_memory("output_data", 16)
    outputs[1].set_shared_memory("output_data", 8, offset=16)
    result = grpc_client.infer("two_io", inputs, outputs=outputs, headers=GRPC_AUTH)

    # As Triton answers: every output has its entry in raw_output_contents (Triton's C++ client reads
    # entry i for output i), empty for one in a region, and no parameters.
    response = result.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("sum", "FP32", [1, 4]),
        ("scaled", "FP32", [1, 2]),
    ]
    assert [len(o.parameters) for o in response.outputs] == [0, 0]
    assert list(response.raw_output_contents) == [b"", b""]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, 4]), expected["sum"])
    np.testing.assert_allclose(
        shm.get_contents_as_numpy(out_handle, np.float32, [1, 2], offset=16), expected["scaled"], rtol=1e-6
    )
    status = grpc_client.get_system_shared_memory_status(headers=GRPC_AUTH)
    assert status.regions["output_data"].key == out_key and status.regions["output_data"].byte_size == 24
    grpc_client.unregister_system_shared_memory(headers=GRPC_AUTH)
    assert not grpc_client.get_system_shared_memory_status(headers=GRPC_AUTH).regions


def test_grpc_mixes_region_and_raw_tensors(server, grpc_client, regions):
    a, b = _two_inputs()
    key, handle = regions(b.nbytes)
    shm.set_shared_memory_region(handle, [b])
    grpc_client.register_system_shared_memory("b_only", key, b.nbytes, headers=GRPC_AUTH)
    out_key, out_handle = regions(16)
    grpc_client.register_system_shared_memory("sum_out", out_key, 16, headers=GRPC_AUTH)
    inputs = [grpcclient.InferInput("a", [1, 4], "FP32"), grpcclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_shared_memory("b_only", b.nbytes)
    outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("scaled")]
    outputs[0].set_shared_memory("sum_out", 16)
    result = grpc_client.infer("two_io", inputs, outputs=outputs, headers=GRPC_AUTH)
    expected = _expected(server, a, b)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["sum", "scaled"]
    assert [len(o.parameters) for o in response.outputs] == [0, 0]
    assert [len(raw) for raw in response.raw_output_contents] == [0, 8]
    np.testing.assert_allclose(result.as_numpy("scaled"), expected["scaled"], rtol=1e-6)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, 4]), expected["sum"])


def test_grpc_stream_reads_and_writes_regions(server, grpc_client, regions):
    """ModelStreamInfer decodes a message that names regions as ModelInfer does (perf_analyzer
    --streaming --shared-memory=system): inputs read from regions, outputs written to them, the answer
    shaped as ModelInfer's; a region that cannot be used fails that request only."""
    a, b = _two_inputs()
    in_key, in_handle = regions(32)
    out_key, out_handle = regions(16)
    grpc_client.register_system_shared_memory("stream_in", in_key, 32, headers=GRPC_AUTH)
    grpc_client.register_system_shared_memory("stream_out", out_key, 16, headers=GRPC_AUTH)
    inputs = [grpcclient.InferInput("a", [1, 4], "FP32"), grpcclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("stream_in", 16)
    inputs[1].set_shared_memory("stream_in", 16, offset=16)
    outputs = [grpcclient.InferRequestedOutput("sum"), grpcclient.InferRequestedOutput("scaled")]
    outputs[0].set_shared_memory("stream_out", 16)
    answers = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=GRPC_AUTH)
    for step in range(3):  # one at a time: each answer's output is in the one region
        shm.set_shared_memory_region(in_handle, [a + step, b])
        grpc_client.async_stream_infer("two_io", inputs, outputs=outputs, request_id=str(step))
        result, error = answers.get(timeout=60)
        assert error is None
        response = result.get_response()
        assert response.id == str(step)
        assert [len(o.parameters) for o in response.outputs] == [0, 0]
        assert [len(raw) for raw in response.raw_output_contents] == [0, 8]
        expected = _expected(server, a + step, b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, [1, 4]), expected["sum"])
        np.testing.assert_allclose(result.as_numpy("scaled"), expected["scaled"], rtol=1e-6)

    inputs[0].set_shared_memory("no_such_region", 16)
    grpc_client.async_stream_infer("two_io", inputs, outputs=outputs, request_id="bad")
    inputs[0].set_shared_memory("stream_in", 16)
    grpc_client.async_stream_infer("two_io", inputs, outputs=outputs, request_id="after")
    (_, bad), (after, error) = answers.get(timeout=60), answers.get(timeout=60)
    assert "no_such_region" in str(bad)
    assert error is None and after.get_response().id == "after"
    grpc_client.stop_stream()


@pytest.mark.parametrize("wire", ["http", "grpc"])
def test_string_tensors_through_regions(server, http, grpc_client, regions, wire):
    """simple_http_shm_string_client (and its gRPC twin): BYTES in and out of regions."""
    text = np.array([str(i).encode() for i in range(16)] + ["héllo".encode(), b""], dtype=object)
    serialized = utils.serialize_byte_tensor(text)
    size = utils.serialized_byte_size(serialized)
    in_key, in_handle = regions(size)
    out_key, out_handle = regions(size)
    shm.set_shared_memory_region(in_handle, [serialized])
    lib, client, headers = (httpclient, http, auth()) if wire == "http" else (grpcclient, grpc_client, GRPC_AUTH)
    client.register_system_shared_memory("text_in", in_key, size, headers=headers)
    client.register_system_shared_memory("text_out", out_key, size, headers=headers)
    inputs = [lib.InferInput("text", [len(text)], "BYTES")]
    inputs[0].set_shared_memory("text_in", size)
    outputs = [lib.InferRequestedOutput("same")]
    outputs[0].set_shared_memory("text_out", size)
    client.infer("strings", inputs, outputs=outputs, headers=headers)
    got = shm.get_contents_as_numpy(out_handle, np.object_, [len(text)])
    assert got.tolist() == text.tolist()


# -- regions that cannot be used -------------------------------------------------------------
def _infer_a_b_from(http, region, offset=0):
    inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory(region, 16, offset=offset)
    inputs[1].set_data_from_numpy(np.ones((1, 4), np.float32))
    return http.infer("two_io", inputs, headers=auth())


def _still_serves(http):
    a, b = _two_inputs()
    inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    np.testing.assert_array_equal(http.infer("two_io", inputs, headers=auth()).as_numpy("sum"), a + b)


def test_unknown_region_and_offsets_past_the_end_are_clear_errors(http, regions):
    with pytest.raises(InferenceServerException, match="no shared memory region named 'nowhere'"):
        _infer_a_b_from(http, "nowhere")
    key, _ = regions(32)
    with pytest.raises(InferenceServerException, match="runs past the end of '/arachne-test-.*' \\(32 bytes\\)"):
        http.register_system_shared_memory("too_far", key, 16, offset=24, headers=auth())
    http.register_system_shared_memory("small", key, 16, offset=8, headers=auth())
    with pytest.raises(InferenceServerException, match="offset 8 \\+ byte_size 16 runs past the end of .*'small'"):
        _infer_a_b_from(http, "small", offset=8)
    text = httpclient.InferInput("text", [1], "BYTES")
    text.set_shared_memory("small", 2**40)  # refused before the server sets aside memory for it
    with pytest.raises(InferenceServerException, match="byte_size 1099511627776 runs past the end of .*'small'"):
        http.infer("strings", [text], headers=auth())
    with pytest.raises(InferenceServerException, match="no shared memory region named 'nowhere'"):
        http.get_system_shared_memory_status("nowhere", headers=auth())
    with pytest.raises(InferenceServerException, match="already registered"):
        http.register_system_shared_memory("small", key, 16, headers=auth())
    _still_serves(http)


def test_region_removed_or_shrunk_by_its_owner_is_an_error_not_a_crash(http, grpc_client, regions):
    removed_key, removed = regions(16)
    http.register_system_shared_memory("removed", removed_key, 16, headers=auth())
    shm.destroy_shared_memory_region(removed)  # the owner unlinks its object
    with pytest.raises(
        InferenceServerException, match="'/arachne-test-.*' of region 'removed' was removed by its owner"
    ):
        _infer_a_b_from(http, "removed")

    shrunk_key, _ = regions(64)
    http.register_system_shared_memory("shrunk", shrunk_key, 64, headers=auth())
    os.truncate("/dev/shm/" + shrunk_key[1:], 8)  # the owner shrinks it after registering
    with pytest.raises(InferenceServerException, match="of region 'shrunk' is now 8 bytes, too small"):
        _infer_a_b_from(http, "shrunk")
    inputs = [grpcclient.InferInput("a", [1, 4], "FP32"), grpcclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(np.ones((1, 4), np.float32))
    inputs[1].set_data_from_numpy(np.ones((1, 4), np.float32))
    outputs = [grpcclient.InferRequestedOutput("sum")]
    outputs[0].set_shared_memory("shrunk", 16, offset=32)  # an output into the shrunk object
    with pytest.raises(InferenceServerException, match="is now 8 bytes") as caught:
        grpc_client.infer("two_io", inputs, outputs=outputs, headers=GRPC_AUTH)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert os.path.getsize("/dev/shm/" + shrunk_key[1:]) == 8  # nothing written past its end
    _still_serves(http)


def test_wrong_sizes_are_refused_before_anything_runs(http, regions):
    key, _ = regions(64)
    http.register_system_shared_memory("r", key, 64, headers=auth())
    inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
    inputs[0].set_shared_memory("r", 12)
    inputs[1].set_shared_memory("r", 16)
    with pytest.raises(InferenceServerException, match="needs 16 bytes, shared_memory_byte_size is 12"):
        http.infer("two_io", inputs, headers=auth())
    inputs[0].set_shared_memory("r", 16)
    outputs = [httpclient.InferRequestedOutput("sum")]
    outputs[0].set_shared_memory("r", 8)
    with pytest.raises(InferenceServerException, match="output 'sum' is 16 bytes, more than the 8 bytes"):
        http.infer("two_io", inputs, outputs=outputs, headers=auth())


# -- who may register what -------------------------------------------------------------------
def test_an_unauthenticated_caller_cannot_register_a_region(server, regions):
    key, _ = regions(16)
    before = _open_descriptors(key)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    with pytest.raises(InferenceServerException, match="missing or wrong bearer token"):
        http.register_system_shared_memory("sneaky", key, 16)
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException, match="missing or wrong bearer token") as caught:
        grpc_client.register_system_shared_memory("sneaky", key, 16)
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    assert server.dataplane.shared_memory.status() == []
    assert _open_descriptors(key) == before


@pytest.mark.parametrize(
    "key",
    ["/..", "/.", "/../../etc/passwd", "relative", "/dev/shm/x", "//x", "/a/b", "/x\x00", "", "/" + "a" * 241],
)
def test_keys_are_posix_shared_memory_names_only(server, key):
    response = requests.post(
        f"{server.url}/v2/systemsharedmemory/region/r/register",
        json={"key": key, "offset": 0, "byte_size": 1},
        headers=auth(),
        timeout=10,
    )
    assert response.status_code == 400 and "must name a POSIX shared memory object" in response.json()["error"]


def test_a_symbolic_link_or_directory_in_dev_shm_is_not_followed(server, tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    name = f"arachne-test-link-{uuid.uuid4().hex[:8]}"
    os.symlink(target, f"/dev/shm/{name}")
    os.mkdir(f"/dev/shm/{name}-dir")
    try:
        for key in (f"/{name}", f"/{name}-dir"):
            response = requests.post(
                f"{server.url}/v2/systemsharedmemory/region/r/register",
                json={"key": key, "offset": 0, "byte_size": 1},
                headers=auth(),
                timeout=10,
            )
            assert response.status_code == 400, response.text
            assert (
                "cannot open" in response.json()["error"] or "is not a shared memory object" in response.json()["error"]
            )
    finally:
        os.unlink(f"/dev/shm/{name}")
        os.rmdir(f"/dev/shm/{name}-dir")


def test_only_peers_on_this_machine_register_and_only_when_enabled(regions):
    key, _ = regions(16)
    registry = SharedMemoryRegistry(max_regions=2)
    for peer in ("10.0.0.5", "192.168.1.2", "2001:db8::1", None, "not-an-address"):
        with pytest.raises(SharedMemoryForbiddenError, match="from this machine only"):
            registry.register("r", key, 0, 16, peer)
    registry.register("r", key, 0, 16, "::1")
    registry.close()
    with pytest.raises(SharedMemoryForbiddenError, match="off on this server"):
        SharedMemoryRegistry().register("r", key, 0, 16, "127.0.0.1")


def test_a_server_without_the_flag_refuses_shared_memory(tmp_path, shm_models, regions):
    key, _ = regions(16)
    off = ThreadServer(tmp_path / "store", grpc=False).start()
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{off.port}")
        assert "system_shared_memory" not in client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException, match="system shared memory is off"):
            client.register_system_shared_memory("r", key, 16)
        off.deploy({"two_io": shm_models["two_io"]})
        inputs = [httpclient.InferInput("a", [1, 4], "FP32"), httpclient.InferInput("b", [1, 4], "FP32")]
        inputs[0].set_shared_memory("r", 16)
        inputs[1].set_shared_memory("r", 16)
        with pytest.raises(InferenceServerException, match="system shared memory is off"):
            client.infer("two_io", inputs)
    finally:
        off.stop()


# -- bounds and clean-up ---------------------------------------------------------------------
def test_caps_on_regions_and_bytes(regions):
    key, _ = regions(4096)
    before = _open_descriptors(key)
    registry = SharedMemoryRegistry(max_regions=2, max_bytes=3000)
    registry.register("one", key, 0, 2000, "127.0.0.1")
    with pytest.raises(SharedMemoryError, match="would pass the server's 3000 bytes"):
        registry.register("two", key, 0, 2000, "127.0.0.1")
    registry.register("two", key, 2000, 1000, "127.0.0.1")
    with pytest.raises(SharedMemoryError, match="at most 2 shared memory regions"):
        registry.register("three", key, 0, 1, "127.0.0.1")
    assert _open_descriptors(key) == before + 2
    registry.unregister("one")
    assert _open_descriptors(key) == before + 1
    registry.close()
    assert _open_descriptors(key) == before and registry.status() == []


def test_regions_are_closed_at_shut_down(tmp_path, regions):
    key, _ = regions(16)
    before = _open_descriptors(key)
    running = ThreadServer(tmp_path / "store", grpc=False, shm_regions=4).start()
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{running.port}")
        client.register_system_shared_memory("r", key, 16)
        assert _open_descriptors(key) == before + 1
    finally:
        running.stop()
    assert _open_descriptors(key) == before


# -- our own client and the remote runtime ---------------------------------------------------
def _client_objects():
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"arachne-{os.getpid()}-")}


def test_device_client_sends_inputs_through_shared_memory(server):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 4)).astype(np.float32)
    with DeviceClient("127.0.0.1", server.port, token=TOKEN) as plain:
        expected = plain.infer("two_io", {"a": a, "b": b})
    with DeviceClient("127.0.0.1", server.port, token=TOKEN, shared_memory=True) as client:
        got = client.infer("two_io", {"a": a, "b": b})
        [region] = client.shared_memory_status()
        assert region["name"] in {name for name in _client_objects()}
        statistics = server.dataplane.statistics("two_io")["model_stats"][0]["inference_stats"]["success"]["count"]
        rows = rng.standard_normal((70_000, 4)).astype(np.float32)  # 1.1 MB: a bigger object, registered anew
        np.testing.assert_array_equal(client.infer("rows", [rows])["y"], _rows_locally(server, rows))
        [grown] = client.shared_memory_status()
        assert grown["name"] != region["name"] and grown["byte_size"] > region["byte_size"]
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert statistics >= 2
    assert _client_objects() == set() and server.dataplane.shared_memory.status() == []


def _rows_locally(server, rows):
    with server.dataplane.store.use("rows") as loaded:
        return loaded.module.infer([rows])[0]


def test_device_client_falls_back_where_shared_memory_is_off(tmp_path, shm_models):
    off = ThreadServer(tmp_path / "store", grpc=False).start()
    try:
        off.deploy({"two_io": shm_models["two_io"]})
        a, b = _two_inputs()
        with DeviceClient("127.0.0.1", off.port, shared_memory=True) as client:
            np.testing.assert_array_equal(client.infer("two_io", [a, b])["sum"], a + b)
            np.testing.assert_array_equal(client.infer("two_io", [a, b])["sum"], a + b)
        assert _client_objects() == set()
    finally:
        off.stop()


def test_remote_runtime_uses_shared_memory_from_the_environment(server, shm_models, monkeypatch):
    monkeypatch.setenv("ARACHNE_SHARED_MEMORY", "1")
    model_file = str(shm_models["rows"] / "model.onnx")
    rows = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    info = {"host": "127.0.0.1", "port": server.port, "token": TOKEN}
    with runtime.init("onnx", model_file=model_file, rpc_info=info) as module:
        module.set_input(0, rows)
        module.run()
        np.testing.assert_array_equal(module.get_output(0), _rows_locally(server, rows))
        assert len(server.dataplane.shared_memory.status()) == 1
    assert server.dataplane.shared_memory.status() == [] and _client_objects() == set()
