"""Device servers run as real processes on loopback ports, for the tests that need a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class ServerProcess:
    """`python -m arachne_mlflow.server` on a free loopback port, started and stopped by tests."""

    def __init__(
        self,
        store,
        token=None,
        extra_args=(),
        ca_cert=None,
        command=("arachne_mlflow.server",),
        python=None,
        env=None,
        host="127.0.0.1",
    ):
        self.command = list(command)  # after `python -m`; ("arachne_mlflow.cli", "serve") for the CLI
        self.python = python or sys.executable  # another venv's interpreter for a server installed there
        self.env = env  # the server's whole environment (default: this process's)
        self.host = host  # "::1" for IPv6 loopback
        self.store = Path(store)
        self.token = token
        self.extra_args = list(extra_args)
        self.ca_cert = ca_cert  # set for a TLS server: the CA that signed its certificate
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ca_cert else 'http'}://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        args = [
            self.python,
            "-m",
            *self.command,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model-store",
            str(self.store),
            "--log-level",
            "warning",
            "--graceful-timeout",
            "1",
            *self.extra_args,
        ]
        if self.token:
            args += ["--token", self.token]
        env = {**(os.environ if self.env is None else self.env), "TF_CPP_MIN_LOG_LEVEL": "3"}
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


class ThreadServer:
    """The app served by uvicorn in a thread of the test process, HTTP and (by default) gRPC on
    loopback ports: real sockets and real clients, without starting a process."""

    def __init__(self, store, token=None, grpc=True, **app_options):
        self.store = Path(store)
        self.token = token
        self.grpc = grpc
        self.app_options = app_options
        self.port = self.grpc_port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dataplane(self):
        return self.app.state.dataplane

    def start(self, timeout: float = 60.0) -> ThreadServer:
        import threading

        import uvicorn

        from arachne_mlflow.server.app import create_app

        self.app = create_app(
            str(self.store), token=self.token, grpc_port=0 if self.grpc else None, grpc_grace=1, **self.app_options
        )
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-thread server did not start")
            time.sleep(0.02)
        while not self.dataplane.ready:  # stored models may still load after the server answers
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-thread server did not become ready")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.grpc_port = getattr(self.app.state, "grpc_port", None)
        return self

    def deploy(self, model_dirs: dict) -> ThreadServer:
        """Upload each model directory under its name."""
        from arachne_mlflow.client import DeviceClient

        with DeviceClient("127.0.0.1", self.port, token=self.token) as device:
            for name, model_dir in model_dirs.items():
                device.upload_model(name, model_dir)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def device_venv_python(variable: str, default: str, make_target: str) -> str:
    """The interpreter of a device venv that `make test` builds (`$variable`, else `default` in the
    checkout): a clear failure naming the make target when it is missing, never a skip."""
    import pytest

    venv = Path(os.environ.get(variable, Path(__file__).resolve().parents[2] / default))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"no device venv at {venv}: build it with `make {make_target}` (or set {variable})", pytrace=False)
    return str(python)
