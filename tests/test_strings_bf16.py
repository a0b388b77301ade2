"""Strings (V2 BYTES) and bfloat16 (BF16): the runtimes, the codec, the flavor, and the server's three
wires (REST JSON, REST binary, gRPC) with tritonclient.

What can travel where: an ONNX string tensor holds UTF-8 text only (onnxruntime's Python API
cannot carry other bytes), so other bytes get a 400 / INVALID_ARGUMENT that says so; a TFLite
string tensor holds any bytes; JSON carries BYTES as text, so it takes and gives UTF-8 only,
binary and gRPC carry any bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import ml_dtypes
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from arachne_mlflow import runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.protocol import codec
from tests.helpers import models
from tests.helpers.servers import ThreadServer

UTF8 = ["abc", "", "héllo wörld", "日本語", "emoji 🙂", "nul\x00inside", " spaces "]
ARBITRARY = [b"\xff\xfe", b"\x00", b"caf\xe9", bytes(range(256)), b""]
BF16 = ml_dtypes.bfloat16
WIRES = ["json", "binary", "grpc"]


def _load(model_dir):
    return runtime.load(read_model_dir(model_dir))


# -- the runtimes -------------------------------------------------------------------------
def test_onnx_string_inputs_take_str_bytes_and_numpy_strings(typed_models):
    with _load(typed_models["onnx_strings"]) as module:
        for value in (
            np.array(UTF8, dtype=object),
            np.array([s.encode() for s in UTF8], dtype=object),
            np.array(UTF8),  # numpy's fixed-width str
            UTF8,
        ):
            [same] = module.infer([value])
            assert same.tolist() == UTF8
        with pytest.raises(InvalidInputError, match="element 1 is not UTF-8 text .*hold UTF-8 text only"):
            module.infer([np.array([b"ok", b"caf\xe9"], dtype=object)])
        with pytest.raises(InvalidInputError, match="element 0 is a int"):
            module.infer([np.array([7], dtype=object)])


def test_onnx_string_output_that_is_not_utf8_is_a_clear_error(typed_models):
    with _load(typed_models["onnx_bad_text"]) as module:
        with pytest.raises(ArachneError, match="string output that is not UTF-8") as caught:
            module.infer([np.ones(1, np.float32)])
    assert caught.value.status_code == 500


def test_tflite_strings_carry_any_bytes(typed_models):
    with _load(typed_models["tflite_strings"]) as module:
        assert module.input_specs[0].dtype == np.dtype(object)
        count, reversed_ = module.infer([np.array(ARBITRARY, dtype=object)])
        assert count.tolist() == [len(ARBITRARY)] and reversed_.tolist() == ARBITRARY[::-1]
        # another length after a string was written (LiteRT then forgets the dimension was dynamic)
        count, reversed_ = module.infer([np.array(UTF8, dtype=object)])
        assert reversed_.tolist() == [s.encode() for s in reversed(UTF8)]


def test_bfloat16_onnx_model_runs_locally(typed_models):
    x = np.array([[1.5, -2.0, 3.25], [0.0, 100.0, -0.125]], BF16)
    with _load(typed_models["onnx_bfloat16"]) as module:
        assert [s.dtype for s in module.input_specs] == [np.dtype(BF16)]
        twice, wide = module.infer([x])
        assert twice.dtype == BF16 and wide.dtype == np.float32
        np.testing.assert_array_equal(twice.astype(np.float32), 2 * x.astype(np.float32))
        np.testing.assert_array_equal(wide, x.astype(np.float32))
        assert module.infer([np.zeros((0, 3), BF16)])[0].shape == (0, 3)
        with pytest.raises(InvalidInputError, match="expected dtype bfloat16, got float32"):
            module.infer([x.astype(np.float32)])


# -- the codec ----------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_codec_carries_bfloat16(binary):
    x = np.array([[1.5, -2.0], [3.25, 1e30]], BF16)
    body, header_length = codec.encode_request({"x": x}, binary=binary)
    decoded = codec.decode_request(body, header_length).inputs["x"]
    assert decoded.dtype == BF16
    np.testing.assert_array_equal(decoded, x)


def test_codec_refuses_what_json_cannot_carry():
    lone_surrogate = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]})
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        codec.decode_request(lone_surrogate.encode(), None)
    request = codec.InferRequest({}, None, binary_output=False)
    with pytest.raises(InvalidInputError, match="BYTES element 1 is not UTF-8 text.*binary_data"):
        codec.encode_response("m", {"y": np.array([b"ok", b"\xff"], dtype=object)}, request)


# -- the server's three wires (slow: real sockets, uploads probed in a child process) ------
@pytest.fixture(scope="module")
def server(tmp_path_factory, typed_models):
    running = ThreadServer(tmp_path_factory.mktemp("typed") / "store").start()
    yield running.deploy({name: path for name, path in typed_models.items() if name != "onnx_bad_text"})
    running.stop()


def _infer(server, model: str, inputs: dict[str, np.ndarray], wire: str) -> dict[str, np.ndarray]:
    """One request through tritonclient: HTTP with JSON or binary tensors, or gRPC (raw contents)."""
    if wire == "grpc":
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        tensors = []
        for name, array in inputs.items():
            tensors.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
        result = client.infer(model, tensors)
        names = [o.name for o in result.get_response().outputs]
    else:
        binary = wire == "binary"
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        tensors = []
        for name, array in inputs.items():
            tensors.append(httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array, binary_data=binary)
        names = [o["name"] for o in client.get_model_metadata(model)["outputs"]]
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
        result = client.infer(model, tensors, outputs=outputs)
    try:
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


def _as_bytes(array: np.ndarray) -> list[bytes]:
    """BYTES outputs as bytes (tritonclient gives JSON's as str, binary's as bytes)."""
    return [item.encode() if isinstance(item, str) else item for item in array.tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("wire", WIRES)
def test_utf8_round_trips_through_an_onnx_string_model(server, wire):
    text = np.array([s.encode() for s in UTF8], dtype=object)
    assert _as_bytes(_infer(server, "onnx_strings", {"text": text}, wire)["same"]) == list(text)


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["binary", "grpc"])
def test_bytes_that_are_not_utf8_are_refused_by_an_onnx_string_model(server, wire):
    text = np.array([b"fine", b"caf\xe9"], dtype=object)
    with pytest.raises(InferenceServerException, match="element 1 is not UTF-8 text") as caught:
        _infer(server, "onnx_strings", {"text": text}, wire)
    assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["binary", "grpc"])
def test_any_bytes_round_trip_through_a_tflite_string_model(server, wire):
    count, reversed_ = _infer(server, "tflite_strings", {"text": np.array(ARBITRARY, dtype=object)}, wire).values()
    assert count.tolist() == [len(ARBITRARY)]
    assert _as_bytes(reversed_) == ARBITRARY[::-1]


@pytest.mark.slow
def test_json_refuses_bytes_it_cannot_carry(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    text = httpclient.InferInput("text", [len(ARBITRARY)], "BYTES")
    text.set_data_from_numpy(np.array(ARBITRARY, dtype=object), binary_data=True)
    as_json = [httpclient.InferRequestedOutput("Identity_1", binary_data=False)]  # the reversed strings
    with pytest.raises(InferenceServerException, match="not UTF-8 text, which JSON cannot carry") as caught:
        client.infer("tflite_strings", [text], outputs=as_json)
    assert caught.value.status() == "400"
    client.close()
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]})
    response = requests.post(f"{server.url}/v2/models/onnx_strings/infer", data=body, timeout=10)
    assert response.status_code == 400 and "not valid Unicode" in response.json()["error"]


@pytest.mark.slow
def test_a_model_giving_text_onnxruntime_cannot_return_is_refused_at_upload_saying_why(server, typed_models):
    """Its smoke inference in the upload's probe child fails: refused before it could ever answer 500."""
    with DeviceClient("127.0.0.1", server.port) as device:
        with pytest.raises(ArachneError, match="string output that is not UTF-8") as caught:
            device.upload_model("onnx_bad_text", typed_models["onnx_bad_text"])
        assert caught.value.status_code == 400
        assert device.model_record("onnx_bad_text") is None  # nothing of it kept


@pytest.mark.slow
def test_grpc_typed_bytes_contents(server):
    """KServe's client sends BYTES list data in `contents.bytes_contents`."""
    request = service_pb2.ModelInferRequest(model_name="onnx_strings")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(UTF8)]).contents.bytes_contents.extend(
        [s.encode() for s in UTF8]
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert codec.tensor_from_bytes("same", "BYTES", [len(UTF8)], response.raw_output_contents[0]).tolist() == [
        s.encode() for s in UTF8
    ]


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["binary", "grpc"])  # (tritonclient refuses BF16 as JSON itself)
def test_bfloat16_through_tritonclient(server, wire):
    x = np.array([[1.5, -2.0, 3.25], [0.0, 100.0, -0.125]], BF16)
    outputs = _infer(server, "onnx_bfloat16", {"x": x}, wire)
    assert outputs["twice"].dtype == BF16
    np.testing.assert_array_equal(outputs["twice"].astype(np.float32), 2 * x.astype(np.float32))
    np.testing.assert_array_equal(outputs["wide"], x.astype(np.float32))


@pytest.mark.slow
def test_bfloat16_as_json_through_the_device_client(server):
    x = np.array([[1.5, -2.0, 3.25]], BF16)
    with DeviceClient("127.0.0.1", server.port) as device:
        got = device.infer("onnx_bfloat16", {"x": x}, binary=False)
        meta = device.model_metadata("onnx_bfloat16")
    assert got["twice"].dtype == BF16 and got["twice"].tolist() == [[3.0, -4.0, 6.5]]
    assert meta["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [-1, 3]}]
    config = requests.get(f"{server.url}/v2/models/onnx_bfloat16/config", timeout=10).json()
    assert [t["data_type"] for t in config["output"]] == ["TYPE_BF16", "TYPE_FP32"]
    strings = requests.get(f"{server.url}/v2/models/onnx_strings/config", timeout=10).json()
    assert strings["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]


# -- the flavor ---------------------------------------------------------------------------
@pytest.mark.slow
def test_bfloat16_onnx_model_saves_with_a_signature_mlflow_reads_back(tmp_path):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from arachne_mlflow.flavors import onnx as arachne_onnx

    arachne_onnx.save_model(models.onnx_bfloat16(), tmp_path / "inferred")
    given = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(BF16), (-1, 3), "x")]),
        outputs=Schema(
            [TensorSpec(np.dtype(BF16), (-1, 3), "twice"), TensorSpec(np.dtype(np.float32), (-1, 3), "wide")]
        ),
    )
    arachne_onnx.save_model(models.onnx_bfloat16(), tmp_path / "given", signature=given)
    for name in ("inferred", "given"):
        model = read_model_dir(tmp_path / name)
        assert [s.dtype for s in model.inputs] == [np.dtype(BF16)]
        assert model.outputs[0].dtype == np.dtype(BF16) and model.outputs[1].dtype == np.float32
        assert "bfloat16" not in str(model.mlmodel["signature"])  # MLflow's part says float32
    # MLflow itself, in a process that has not imported ml_dtypes, reads and serves the model
    code = f"""
import sys, numpy as np, mlflow.pyfunc
assert "ml_dtypes" not in sys.modules
model = mlflow.pyfunc.load_model({str(tmp_path / "inferred")!r})
print(model.metadata.signature.inputs.inputs[0].type)
print(model.predict(np.array([[1.5, -2, 3.3]], np.float32))["twice"].tolist())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "float32" and out[1] == "[[3.0, -4.0, 6.59375]]"  # 3.3 rounds to bfloat16 3.296875
