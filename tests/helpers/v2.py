"""Open Inference Protocol requests for tests: bodies, the bad requests every server must refuse with
a 4xx, the routes, and the outputs a model gives when run locally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.server.app import create_app


def model_inputs(model_dir, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    specs = read_model_dir(model_dir).inputs
    return {s.name: rng.standard_normal(s.example_shape(batch)).astype(s.dtype) for s in specs}


def local_outputs(model_dir, inputs):
    model = read_model_dir(model_dir)
    with arachne_runtime.load(model) as module:
        outputs = module.infer([inputs[s.name] for s in model.inputs])
    return {spec.name: out for spec, out in zip(module.output_specs, outputs)}


def binary_body(header, blob=b""):
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


BAD_REQUESTS = {
    "malformed json": (b'{"inputs": [', {}),
    "truncated binary": binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]},
        b"\0" * 8,
    ),
    "header length too large": (b'{"inputs": []}', {"Inference-Header-Content-Length": "9999"}),
    "header length negative": (b'{"inputs": []}', {"Inference-Header-Content-Length": "-1"}),
    "header length not a number": (b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}),
    "wrong dtype": (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [0.0] * 4}]}).encode(),
        {},
    ),
    "wrong shape": (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0.0] * 4}]}).encode(),
        {},
    ),
    "count mismatch": (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0]}]}).encode(),
        {},
    ),
    "terabyte shape": binary_body(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1 << 20, 1 << 20], "parameters": {"binary_data_size": 16}}
            ]
        },
        b"\0" * 16,
    ),
    "unknown datatype": (
        json.dumps({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [0]}]}).encode(),
        {},
    ),
    "bytes for numeric": (
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 4], "data": ["a", "b", "c", "d"]}]}
        ).encode(),
        {},
    ),
    "unknown input": (
        json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]}).encode(),
        {},
    ),
    "bad gzip": (b"not gzip at all", {"Content-Encoding": "gzip"}),
    "unknown encoding": (b"{}", {"Content-Encoding": "br"}),
    "string data": (
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["1", "2", "3", "4"]}]}
        ).encode(),
        {},
    ),
}


ROUTES = [
    ("GET", "/v2"),
    ("GET", "/v2/models/m"),
    ("GET", "/v2/models/m/ready"),
    ("GET", "/v2/models/m/config"),
    ("GET", "/v2/models/m/stats"),
    ("GET", "/v2/models/stats"),
    ("POST", "/v2/models/m/infer"),
    ("POST", "/v2/models/m/benchmark"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/m/load"),
    ("POST", "/v2/repository/models/m/unload"),
    ("GET", "/v2/repository/models/m"),
    ("PUT", "/v2/repository/models/m"),
    ("DELETE", "/v2/repository/models/m"),
    ("GET", "/metrics"),
]


def app_routes(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    auth = create_app(str(tmp_path / "enumerated-store"), token="any-token")
    front = auth.app  # bearer auth -> InferRoute -> Starlette
    routes = list(front.routes)
    for route in front.app.routes:
        routes += [(method, route.path) for method in sorted(route.methods - {"HEAD"})]
    return [(method, path.replace("{model}", "m").replace("{version}", "1")) for method, path in routes]
