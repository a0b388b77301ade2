"""The registry workflow per flavor, and MLflow's scoring server and CLI as real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them


def _register(flavor_case, name):
    info = flavor_case.flavor.log_model(
        flavor_case.model,
        name="model",
        registered_model_name=name,
        input_example=flavor_case.example,
        **flavor_case.kwargs,
    )
    MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)
    return info


def _expected(flavor_case):
    with flavor_case.direct() as direct:
        return direct.infer([flavor_case.example])[0]


def test_register_alias_and_load_by_name(mlflow_store, flavor_case):
    name = f"registry-{flavor_case.name}"
    info = _register(flavor_case, name)
    assert info.registered_model_version == 1
    expected = _expected(flavor_case)
    for uri in (f"models:/{name}@champion", f"models:/{name}/1"):
        np.testing.assert_equal(mlflow.pyfunc.load_model(uri).predict(flavor_case.example), expected)
        with flavor_case.flavor.load_model(uri) as module:
            np.testing.assert_equal(module.infer([flavor_case.example])[0], expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_ready(process, url, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)  # polling a starting server: there is no event to wait on
    raise AssertionError(f"{url} not ready after {timeout} s")


def test_mlflow_models_serve_and_predict(mlflow_store, flavor_case, tmp_path):
    name = f"serve-{flavor_case.name}"
    _register(flavor_case, name)
    expected = _expected(flavor_case)
    # the scoring server runs `uvicorn` from PATH: the venv's bin must be on it, as when activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PATH": path}
    mlflow_cli = [sys.executable, "-m", "mlflow", "models"]
    payload = {"inputs": flavor_case.example.tolist()}

    (tmp_path / "input.json").write_text(json.dumps(payload))
    port = _free_port()
    server = subprocess.Popen(
        [
            *mlflow_cli,
            "serve",
            "-m",
            f"models:/{name}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # `mlflow models predict` runs meanwhile: both spend their time starting up
    predict = subprocess.Popen(
        [
            *mlflow_cli,
            "predict",
            "-m",
            f"models:/{name}/1",
            "-i",
            str(tmp_path / "input.json"),
            "-t",
            "json",
            "-o",
            str(tmp_path / "output.json"),
            "--env-manager",
            "local",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_ready(server, f"http://127.0.0.1:{port}/ping")
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_equal(np.asarray(response.json()["predictions"], np.float32), expected)
    finally:
        server.terminate()
        server.wait(timeout=30)
        _, errors = predict.communicate(timeout=120)
    assert predict.returncode == 0, errors
    predictions = json.loads((tmp_path / "output.json").read_text())["predictions"]
    np.testing.assert_equal(np.asarray(predictions, np.float32), expected)
