"""A real nginx (Debian's package, `make system-deps`) on loopback, running examples/pull-cache/nginx.conf
with its three EDIT lines pointed at a test's tracking server, port and cache directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import requests

from tests.helpers.servers import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pull-cache" / "nginx.conf"


class Nginx:
    def __init__(self, root: Path, upstream_port: int):
        self.root, self.port = Path(root), free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "nginx.conf"
        text = EXAMPLE.read_text()
        for line, replaced in (
            ("/var/cache/nginx/mlflow", str(self.root / "cache")),
            ("server 127.0.0.1:5000;", f"server 127.0.0.1:{upstream_port};"),
            ("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{self.port};"),
        ):
            if text.count(line) != 1:
                raise RuntimeError(f"{EXAMPLE} no longer has one {line!r} (an EDIT line)")
            text = text.replace(line, replaced)
        self.config.write_text(text)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        directives = "daemon off; master_process on;" + (" user root root;" if os.geteuid() == 0 else "")
        args = [binary, "-p", str(self.root), "-c", str(self.config), "-g", directives]
        log = open(self.root / "nginx.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # polling a starting process: there is no event to wait on
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.read_log()}")
            try:
                requests.get(self.url + "/nginx-probe", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx not ready after {timeout}s: {self.read_log()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def read_log(self) -> str:
        return (self.root / "nginx.log").read_text(errors="replace")[-3000:]
