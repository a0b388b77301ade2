"""A hostile MLflow tracking server on loopback: the REST routes a following device calls, answered badly on purpose.

`mode` picks how the alias (and version) answers go wrong; `trickle_artifacts` sends files a byte
every half second. Every request is kept in `requests` (method and path with its query).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_JSON = 8 * 1024**2


class HostileRegistry:
    def __init__(self, registered: str, model_dir: Path | None = None):
        self.registered, self.model_dir = registered, model_dir
        self.mode = "normal"
        self.trickle_artifacts = False
        self.requests: list[tuple[str, str]] = []
        handler = type("Handler", (_Handler,), {"registry": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, route: str) -> int:
        return sum(1 for _, path in list(self.requests) if path.startswith(route))

    def version_answer(self) -> bytes:
        mv = {"name": self.registered, "version": "1", "status": "READY", "run_id": "r1", "source": "models:/m-1"}
        if self.mode == "pending":
            mv["status"] = "PENDING_REGISTRATION"
        elif self.mode == "other-name":
            mv["name"] = "someone-elses-model"
        elif self.mode == "tags-int":
            mv["tags"] = 5
        elif self.mode == "source-list":
            mv["source"] = ["models:/m-1"]
        body = json.dumps({"model_version": mv}).encode()
        if self.mode == "padded":  # just under the 8 MiB cap, padded with {}
            count = (MAX_JSON - len(body) - 64) // 3
            body = body[:-1] + b', "pad": [' + b"{}," * count + b"{}]}"
        return body


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: HostileRegistry
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.registry.requests.append(("GET", self.path))
        route = urlsplit(self.path).path
        if route in ("/api/2.0/mlflow/registered-models/alias", "/api/2.0/mlflow/model-versions/get"):
            body = self.registry.version_answer()
            self._answer(200, body, trickle=1.0 if self.registry.mode == "trickle" else 0)
        elif route == "/model-versions/get-artifact":
            path = parse_qs(urlsplit(self.path).query)["path"][0]
            file = self.registry.model_dir / path if self.registry.model_dir else None
            if file is None or not file.is_file():
                self._answer(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such file"}')
            else:
                self._answer(200, file.read_bytes(), trickle=0.5 if self.registry.trickle_artifacts else 0)
        else:
            self._answer(404, b"{}")

    def do_POST(self):
        self.registry.requests.append((self.command, self.path))
        self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 20))
        self._answer(403, b'{"error_code": "PERMISSION_DENIED", "message": "read-only"}')

    do_DELETE = do_POST

    def _answer(self, status: int, body: bytes, trickle: float = 0) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not trickle:
                self.wfile.write(body)
                return
            for index in range(len(body)):
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
                time.sleep(trickle)
        except OSError:
            pass  # the device hung up

    def log_message(self, *args):
        pass
