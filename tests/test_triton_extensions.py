"""Triton's model-configuration and statistics extensions: the routes in this process, then read by
tritonclient over HTTP and gRPC from a server on loopback (slow: uploads probe in a child process)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from arachne_mlflow.server.batching import BatchingPolicy, BatchingSettings
from tests.helpers.servers import ThreadServer
from tests.helpers.v2 import local_outputs, model_inputs

MODELS = ["onnx_linear", "tflite_cnn"]
LINEAR_CONFIG = {
    "name": "onnx_linear",
    "platform": "arachne_onnx",
    "backend": "onnx",
    "max_batch_size": 0,  # no batcher: dims are the whole shapes
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1, 4]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1, 3]}],
}
X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


# -- in this process ----------------------------------------------------------------------
def test_extensions_are_advertised(app_client):
    extensions = app_client.get("/v2").json()["extensions"]
    assert "model_configuration" in extensions and "statistics" in extensions


def test_config_route(app_client):
    assert app_client.get("/v2/models/onnx_linear/config").json() == LINEAR_CONFIG
    assert app_client.get("/v2/models/onnx_linear/versions/1/config").json() == LINEAR_CONFIG
    for path, status in (("/v2/models/nope/config", 404), ("/v2/models/onnx_linear/versions/9/config", 404)):
        response = app_client.get(path)
        assert response.status_code == status and response.json()["error"]


def test_statistics_routes_count_this_tests_requests(app_client):
    def stats():
        [model] = app_client.get("/v2/models/onnx_linear/stats").json()["model_stats"]
        return model

    before = stats()
    for _ in range(3):
        assert app_client.post("/v2/models/onnx_linear/infer", json=X).status_code == 200
    bad = {"inputs": [{**X["inputs"][0], "shape": [4, 1]}]}
    assert app_client.post("/v2/models/onnx_linear/infer", json=bad).status_code == 400
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3
    for key, added in (("success", 3), ("fail", 1), ("queue", 3), ("compute_infer", 3)):
        assert after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"] == added
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    every = app_client.get("/v2/models/stats").json()["model_stats"]
    assert [m["name"] for m in every] == ["onnx_linear"]
    assert app_client.get("/v2/models/nope/stats").status_code == 404


def test_load_with_a_new_config_is_refused(app_client):
    for parameters in ({"config": '{"max_batch_size": 4}'}, {"file:1/model.onnx": "AA=="}):
        response = app_client.post("/v2/repository/models/onnx_linear/load", json={"parameters": parameters})
        assert response.status_code == 400 and "not supported" in response.json()["error"]
    assert app_client.post("/v2/repository/models/onnx_linear/load", json={"parameters": {}}).status_code == 200
    assert app_client.get("/v2/models/onnx_linear/ready").status_code == 200


# -- tritonclient on loopback -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_models):
    batching = BatchingPolicy(per_model={"batched_cnn": BatchingSettings(8, (4, 8), 100_000)})
    running = ThreadServer(tmp_path_factory.mktemp("triton") / "store", batching=batching).start()
    yield running.deploy({**{name: mlflow_models[name] for name in MODELS}, "batched_cnn": mlflow_models["tflite_cnn"]})
    running.stop()


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture
def grpc_client(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def _http_inputs(feed, binary=True):
    tensors = []
    for name, array in feed.items():
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def _grpc_inputs(feed):
    tensors = []
    for name, array in feed.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _numbers(value):
    """gRPC's JSON (protobuf's) writes 64-bit integers as strings; Triton's HTTP JSON as numbers."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


@pytest.mark.slow
def test_model_config_through_tritonclient(http, grpc_client):
    config = http.get_model_config("onnx_linear")
    assert config == LINEAR_CONFIG
    assert http.get_model_config("onnx_linear", model_version="1") == config
    assert http.get_model_config("tflite_cnn")["input"][0]["dims"] == [-1, 8, 8, 3]
    over_grpc = grpc_client.get_model_config("onnx_linear", as_json=True)["config"]
    assert _numbers(over_grpc) == {k: v for k, v in config.items() if v != 0}  # protobuf's JSON leaves out zeros
    for call in (lambda: http.get_model_config("nope"), lambda: http.get_model_config("onnx_linear", "9")):
        with pytest.raises(InferenceServerException, match="no model 'nope'|no version '9'"):
            call()
    with pytest.raises(InferenceServerException, match="no model 'nope'") as caught:
        grpc_client.get_model_config("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.slow
def test_statistics_through_tritonclient_count_the_requests_made(server, http, grpc_client, mlflow_models):
    name = f"counted_{uuid.uuid4().hex[:8]}"  # a model only this test sends requests to
    server.deploy({name: mlflow_models["onnx_linear"]})
    empty = http.get_inference_statistics(name)["model_stats"][0]
    assert (empty["inference_count"], empty["execution_count"], empty["last_inference"]) == (0, 0, 0)
    feed = model_inputs(mlflow_models["onnx_linear"])
    before = time.time_ns() // 1_000_000
    for binary in (True, False, True):
        http.infer(name, _http_inputs(feed, binary))
    for _ in range(2):
        grpc_client.infer(name, _grpc_inputs(feed))
    bad = {"x": feed["x"].reshape(4, 1)}
    for call in (lambda: http.infer(name, _http_inputs(bad)), lambda: grpc_client.infer(name, _grpc_inputs(bad))):
        with pytest.raises(InferenceServerException):
            call()
    after = time.time_ns() // 1_000_000

    stats = http.get_inference_statistics(name)
    assert [s["name"] for s in stats["model_stats"]] == [name]
    model = stats["model_stats"][0]
    assert model["version"] == "1" and before <= model["last_inference"] <= after
    assert model["inference_count"] == model["execution_count"] == 5
    inference = model["inference_stats"]
    assert inference["success"]["count"] == 5 and inference["fail"]["count"] == 2
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == 5 and inference[key]["ns"] >= 0
    assert inference["compute_infer"]["ns"] > 0 and inference["fail"]["ns"] > 0
    parts = sum(inference[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= inference["success"]["ns"]  # the parts of each request's time, within its whole
    [batch] = model["batch_stats"]
    assert batch["batch_size"] == 1 and batch["compute_infer"] == inference["compute_infer"]
    # the same numbers through gRPC and through the every-model route
    over_grpc = _numbers(grpc_client.get_inference_statistics(name, as_json=True))["model_stats"][0]
    assert over_grpc["inference_count"] == 5 and over_grpc["inference_stats"]["fail"] == inference["fail"]
    assert over_grpc["inference_stats"]["success"] == inference["success"]
    every = {s["name"]: s for s in http.get_inference_statistics()["model_stats"]}
    assert set(MODELS) | {name} <= set(every) and every[name]["inference_count"] == 5
    assert requests.get(f"{server.url}/v2/models/{name}/versions/1/stats", timeout=10).json() == stats
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        http.get_inference_statistics("nope")


@pytest.mark.slow
def test_batching_is_reported_and_counted(server, http, grpc_client, mlflow_models):
    """A batching model: config and metadata say so; statistics count samples and merged executions."""
    config = http.get_model_config("batched_cnn")
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"] == {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 100_000}
    assert config["input"][0]["dims"] == [8, 8, 3]  # the batch dimension left out
    assert http.get_model_metadata("batched_cnn")["inputs"][0]["shape"] == [-1, 8, 8, 3]
    over_grpc = _numbers(grpc_client.get_model_config("batched_cnn", as_json=True))["config"]
    assert over_grpc["max_batch_size"] == 8 and over_grpc["dynamic_batching"] == config["dynamic_batching"]
    assert http.get_model_config("tflite_cnn")["max_batch_size"] == 0  # the same model, not batching

    start = http.get_inference_statistics("batched_cnn")["model_stats"][0]
    feeds = [model_inputs(mlflow_models["tflite_cnn"], batch=rows, seed=rows) for rows in (1, 3)]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=2)
    pending = [client.async_infer("batched_cnn", _http_inputs(feed)) for feed in feeds]  # within the queue delay
    for request in pending:  # one run of 4 rows (a preferred size)
        request.get_result()
    client.close()
    model = http.get_inference_statistics("batched_cnn")["model_stats"][0]
    assert model["inference_count"] - start["inference_count"] == 4  # samples, not requests
    executions = model["execution_count"] - start["execution_count"]
    assert executions in (1, 2)  # merged (the usual case) or, on a slow machine, one run each
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in model["batch_stats"]}
    assert batches == ({4: 1} if executions == 1 else {1: 1, 3: 1})
    stats = model["inference_stats"]
    assert stats["success"]["count"] - start["inference_stats"]["success"]["count"] == 2
    assert stats["queue"]["ns"] > 0 and stats["compute_infer"]["ns"] > 0
    # gRPC requests go through the same batcher
    result = grpc_client.infer("batched_cnn", _grpc_inputs(feeds[1]))
    expected = local_outputs(mlflow_models["tflite_cnn"], feeds[1])
    [(output, value)] = expected.items()
    np.testing.assert_allclose(result.as_numpy(output), value, rtol=1e-6)


@pytest.mark.slow
def test_load_with_a_new_config_is_refused_through_tritonclient(http):
    with pytest.raises(InferenceServerException, match="not supported"):
        http.load_model("onnx_linear", config='{"max_batch_size": 4}')
    http.load_model("onnx_linear")
    assert http.is_model_ready("onnx_linear")
