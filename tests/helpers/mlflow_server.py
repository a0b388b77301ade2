"""A real `mlflow server` process on a loopback port (sqlite backend, artifacts served by the server).

It can be stopped and started again on the same port with the same database (outage tests), and
run MLflow's basic-auth app (`--app-name basic-auth`) with an admin user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.helpers.servers import free_port

# Set for the test process too: `import mlflow` starts telemetry unless told not to (see the REST notes).
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
ADMIN = ("admin", "admin-password-123")  # the basic-auth app's admin (it refuses passwords under 12 characters)


class MlflowServer:
    """`python -m mlflow server` under `root` (one worker, --serve-artifacts), started and stopped by tests.

    It runs in its own session, so that stopping it stops its children too.
    """

    def __init__(self, root: Path, port: int | None = None, basic_auth: bool = False):
        self.root = Path(root)
        self.basic_auth = basic_auth
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        args = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, **QUIET_ENV}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        if self.basic_auth:  # no permission unless granted: what a least-privilege set-up starts from
            args += ["--app-name", "basic-auth"]
            config = self.root / "auth.ini"
            config.write_text(
                "[mlflow]\n"
                "default_permission = NO_PERMISSIONS\n"
                f"database_uri = sqlite:///{self.root / 'auth.db'}\n"
                f"admin_username = {ADMIN[0]}\n"
                f"admin_password = {ADMIN[1]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            env.update({"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "arachne-tests"})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # polling a starting process: there is no event to wait on
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}: {self.read_log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {timeout}s: {self.read_log()}")

    def stop(self) -> None:
        """Stop the server and its workers (the whole process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]
