"""Sequence batching is not served: tritonclient's sequence parameters get a 400 / INVALID_ARGUMENT that says
so, over REST and gRPC; a request without a sequence (Triton's zero id) runs as usual."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from arachne_mlflow.flavors import onnx as onnx_flavor
from tests.helpers import models
from tests.helpers.servers import ThreadServer

X = np.arange(4, dtype=np.float32).reshape(1, 4)
SEQUENCES = [
    {"sequence_id": 42, "sequence_start": True},
    {"sequence_id": "session-a", "sequence_end": True},
    {"sequence_id": 42},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    onnx_flavor.save_model(models.onnx_linear(1), root / "linear")
    running = ThreadServer(root / "store").start()
    yield running.deploy({"linear": root / "linear"})
    running.stop()


def _infer(module, client, **kwargs):
    tensor = module.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer("linear", [tensor], **kwargs)


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_http_sequence_is_refused(server, sequence):
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(InferenceServerException, match="sequence batching is not supported") as caught:
            _infer(httpclient, client, **sequence)
        assert caught.value.status() == "400"
        assert _infer(httpclient, client, sequence_id=0).as_numpy("y").shape == (1, 3)  # zero: no sequence


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_grpc_sequence_is_refused(server, sequence):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException, match="sequence batching is not supported") as caught:
        _infer(grpcclient, client, **sequence)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert _infer(grpcclient, client).as_numpy("y").shape == (1, 3)
    client.close()


def test_a_plain_rest_request_naming_an_end_without_id_is_refused_too(server):
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X.ravel().tolist()}],
        "parameters": {"sequence_end": True},
    }
    response = requests.post(f"{server.url}/v2/models/linear/infer", json=body, timeout=30)
    assert response.status_code == 400 and "sequence_end" in response.json()["error"]
    body["parameters"] = {"sequence_id": 0, "sequence_start": False}
    assert requests.post(f"{server.url}/v2/models/linear/infer", json=body, timeout=30).status_code == 200
