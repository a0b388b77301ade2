"""MLflow-format model directories written by hand (no MLflow), and device servers run as processes.

The MLmodel written here is what `arachne_mlflow.model_dir` reads: an `arachne` flavor block
and a tensor-based signature.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml


def _signature(specs):
    return json.dumps([
        {"name": s["name"], "type": "tensor", "tensor-spec": {"dtype": s["dtype"], "shape": list(s["shape"])}}
        for s in specs
    ])


def write_model_dir(directory, runtime, model_file, spec, params_file=None, runtime_options=None):
    """Copy `model_file` (and `params_file`) into `directory` and write its MLmodel; return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_name = f"model{Path(model_file).suffix}"
    shutil.copy(model_file, directory / model_name)
    arachne = {"runtime": runtime, "model_file": model_name, "runtime_options": runtime_options or {}}
    if runtime == "tvm":
        arachne["tvm"] = {"device": "cpu"}
        if params_file:
            shutil.copy(params_file, directory / "params.bin")
            arachne["tvm"]["params_file"] = "params.bin"
    mlmodel = {
        "flavors": {"arachne": arachne, "python_function": {"loader_module": "arachne_mlflow.pyfunc"}},
        "signature": {"inputs": _signature(spec["inputs"]), "outputs": _signature(spec["outputs"])},
    }
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (directory / "requirements.txt").write_text("arachne-mlflow\n")
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m arachne_mlflow.server` on a free loopback port, started and stopped by tests."""

    def __init__(self, store, token=None, extra_args=(), ca_cert=None, command=("arachne_mlflow.server",)):
        self.command = list(command)  # after `python -m`; ("arachne_mlflow.cli", "serve") for the CLI
        self.store = Path(store)
        self.token = token
        self.extra_args = list(extra_args)
        self.ca_cert = ca_cert  # set for a TLS server: the CA that signed its certificate
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_cert else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        args = [sys.executable, "-m", *self.command, "--port", str(self.port),
                "--model-store", str(self.store), "--log-level", "warning", "--graceful-timeout", "1",
                *self.extra_args]
        if self.token:
            args += ["--token", self.token]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.log = open(self.store.parent / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_log()}")
            try:
                ready = requests.get(self.url + "/v2/health/ready", timeout=1, verify=self.ca_cert or True)
                if ready.status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s: {self.read_log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.log.close()

    def read_log(self) -> str:
        return (self.store.parent / f"server-{self.port}.log").read_text(errors="replace")[-3000:]


def runtime_details(runtime, model_file):
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init(runtime, model_file=str(model_file)) as module:
        return {"inputs": module.get_input_details(), "outputs": module.get_output_details()}


@pytest.fixture(scope="module")
def mlflow_models(tmp_path_factory, onnx_linear_file, onnx_two_io_file, tflite_cnn_file, tflite_two_inputs_file,
                  tvm_linear, tvm_two_io):
    """Hand-written MLflow model dirs of every test model, by short name (all three runtimes)."""
    root = tmp_path_factory.mktemp("mlflow-models")
    return {
        "onnx_linear": write_model_dir(root / "onnx_linear", "onnx", onnx_linear_file,
                                       runtime_details("onnx", onnx_linear_file)),
        "onnx_two_io": write_model_dir(root / "onnx_two_io", "onnx", onnx_two_io_file,
                                       runtime_details("onnx", onnx_two_io_file)),
        "tflite_cnn": write_model_dir(root / "tflite_cnn", "tflite", tflite_cnn_file,
                                      runtime_details("tflite", tflite_cnn_file), runtime_options={"num_threads": 1}),
        "tflite_two_inputs": write_model_dir(root / "tflite_two_inputs", "tflite", tflite_two_inputs_file,
                                             runtime_details("tflite", tflite_two_inputs_file)),
        "tvm_linear": write_model_dir(root / "tvm_linear", "tvm", tvm_linear["model_file"], tvm_linear["model_spec"],
                                      params_file=tvm_linear["params_file"]),
        "tvm_two_io": write_model_dir(root / "tvm_two_io", "tvm", tvm_two_io["model_file"], tvm_two_io["model_spec"]),
    }
