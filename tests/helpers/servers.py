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
        self, store, token=None, extra_args=(), ca_cert=None, command=("arachne_mlflow.server",), python=None, env=None
    ):
        self.command = list(command)  # after `python -m`; ("arachne_mlflow.cli", "serve") for the CLI
        self.python = python or sys.executable  # another venv's interpreter for a server installed there
        self.env = env  # the server's whole environment (default: this process's)
        self.store = Path(store)
        self.token = token
        self.extra_args = list(extra_args)
        self.ca_cert = ca_cert  # set for a TLS server: the CA that signed its certificate
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_cert else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        args = [
            self.python,
            "-m",
            *self.command,
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
