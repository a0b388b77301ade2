"""The device server's route logic in this process (Starlette's TestClient over `create_app`): error
answers, paths, auth, metrics. What needs a real process (sockets, kill -9, restarts, real clients)
is in test_server.py, test_security.py and test_reliability.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from arachne_mlflow.protocol import codec
from arachne_mlflow.server.app import create_app
from tests.helpers.archives import model_tar
from tests.helpers.model_dirs import write_model_dir
from tests.helpers.v2 import BAD_REQUESTS, ROUTES, local_outputs

X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
INFER = "/v2/models/onnx_linear/infer"


def _series(app_client, model="onnx_linear"):
    samples = {}
    for family in text_string_to_metric_families(app_client.get("/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model") == model or sample.name.startswith("arachne_http_errors"):
                key = sample.labels.get("le") or sample.labels.get("status")
                samples[(sample.name, key)] = sample.value
    return samples


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_infer_requests_are_400_and_the_model_still_serves(app_client, case):
    body, headers = BAD_REQUESTS[case]
    response = app_client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]
    assert app_client.post(INFER, json=X).status_code == 200


def test_json_and_binary_infer_equal_a_local_run(app_client, onnx_linear_model):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    expected = local_outputs(onnx_linear_model, {"x": x})["y"]
    body, length = codec.encode_request({"x": x}, binary=True)
    response = app_client.post(INFER, content=body, headers={codec.HEADER_LENGTH: str(length)})
    binary = codec.decode_response(response.content, response.headers[codec.HEADER_LENGTH])["y"]
    as_json = codec.decode_response(app_client.post(INFER, json=X).content, None)["y"]
    np.testing.assert_equal(binary, expected)
    np.testing.assert_array_equal(as_json, local_outputs(onnx_linear_model, {"x": x + 1})["y"])


def test_errors_are_counted(app_client):
    app_client.post(INFER, json=X)  # the model has a series
    before = _series(app_client)
    for body, headers in BAD_REQUESTS.values():
        assert app_client.post(INFER, content=body, headers=headers).status_code == 400
    after = _series(app_client)
    errors, http_400 = ("arachne_inference_errors_total", None), ("arachne_http_errors_total", "400")
    # the two bad encodings are refused before the request reaches the model
    assert after[errors] - before[errors] == len(BAD_REQUESTS) - 2
    assert after[http_400] - before.get(http_400, 0.0) == len(BAD_REQUESTS)


def test_inference_series_add_up(app_client):
    """Every request is counted once: answered ones in the latency histogram, failed ones as errors."""
    before = _series(app_client)
    for _ in range(3):
        assert app_client.post(INFER, json=X).status_code == 200
    after = _series(app_client)
    grew = {key: after[key] - before.get(key, 0.0) for key in after}
    assert grew[("arachne_inference_requests_total", None)] == 3
    assert grew[("arachne_inference_latency_seconds_count", None)] == 3
    assert grew[("arachne_inference_latency_seconds_bucket", "+Inf")] == 3
    assert grew[("arachne_inference_errors_total", None)] == 0
    assert all(
        ("arachne_inference_" + name, None) in after  # as prometheus_client's own metrics write them
        for name in ("requests_created", "errors_created", "latency_seconds_created")
    )
    assert after[("arachne_inference_requests_total", None)] == (
        after[("arachne_inference_latency_seconds_count", None)] + after[("arachne_inference_errors_total", None)]
    )
    buckets = [
        value
        for (name, le), value in sorted(after.items(), key=lambda kv: float(kv[0][1] or 0))
        if name == "arachne_inference_latency_seconds_bucket"
    ]
    assert buckets == sorted(buckets) and 0 < after[("arachne_inference_latency_seconds_sum", None)] < 60


def test_infer_paths_answer_like_every_route(app_client):
    """Infer is answered in front of Starlette: methods, versions and odd paths still get JSON answers."""
    for method in ("GET", "PUT", "DELETE"):
        response = app_client.request(method, INFER)
        assert response.status_code == 405 and response.headers["Allow"] == "POST"
        assert "use POST" in response.json()["error"]
    revision = str(app_client.get("/v2/repository/models/onnx_linear").json()["revision"])
    versioned = app_client.post(f"/v2/models/onnx_linear/versions/{revision}/infer", json=X)
    assert versioned.json()["model_version"] == revision
    assert "no version '99'" in app_client.post("/v2/models/onnx_linear/versions/99/infer", json=X).json()["error"]
    for path in ("/v2/models//infer", "/v2/models/onnx_linear/versions//infer", "/v2/models/a/b/infer"):
        response = app_client.post(path, json=X)
        assert response.status_code == 404 and response.json()["error"], path


def test_unknown_models_bad_names_and_routes(app_client):
    assert app_client.post("/v2/models/missing/infer", json=X).status_code == 404
    assert app_client.get("/v2/models/missing").status_code == 404
    for name in ["..", "a..b", "%2e%2e", ".hidden", "x" * 200, "a%2Fb"]:
        response = app_client.put(f"/v2/repository/models/{name}", content=b"")
        assert response.status_code in (400, 404), (name, response.status_code)
        assert "error" in response.json()
    response = app_client.get("/no/such/route")
    assert response.status_code == 404 and response.json()["error"]


def test_the_token_guards_every_route_but_health(tmp_path):
    with TestClient(create_app(str(tmp_path / "store"), token="s3cret")) as secured:
        for method, path in ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = secured.request(method, path, headers=headers, content=b"{}")
                assert response.status_code == 401, (method, path, headers)
                assert "bearer token" in response.json()["error"]
                assert response.headers["WWW-Authenticate"] == "Bearer"
        assert secured.get("/v2/health/live").status_code == 200
        assert secured.get("/v2/health/ready").status_code == 200
        index = secured.post("/v2/repository/index", headers={"Authorization": "Bearer s3cret"}, content=b"{}")
        assert index.status_code == 200 and index.json() == []


def test_model_metadata_and_record(app_client):
    metadata = app_client.get("/v2/models/onnx_linear").json()
    assert metadata["platform"] == "arachne_onnx"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]
    assert app_client.get("/v2/models/onnx_linear/ready").json() == {"name": "onnx_linear", "ready": True}
    record = app_client.get("/v2/repository/models/onnx_linear").json()
    assert record["runtime"] == "onnx" and record["state"] == "READY" and record["digest"].startswith("sha256:")
    assert json.loads(json.dumps(record)) == record  # plain JSON, nothing the client cannot read


def test_a_plugin_written_the_earlier_way_serves(app_client, tmp_path):
    """A runtime plugin that overrides the stateful methods (`simple-legacy`) serves like any other."""
    (tmp_path / "factor.txt").write_text("3")
    spec = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
    }
    model = write_model_dir(tmp_path / "legacy", "simple-legacy", tmp_path / "factor.txt", spec)
    assert app_client.put("/v2/repository/models/legacy", content=model_tar(model)).status_code == 200
    answer = app_client.post("/v2/models/legacy/infer", json=X)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
    assert app_client.get("/v2/models/legacy").json()["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert app_client.delete("/v2/repository/models/legacy").status_code == 200
