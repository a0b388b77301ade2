"""The tracking server calls a pulling device makes to deliver its captured samples, over REST.

A run's artifacts are written through MLflow's artifact proxy (`mlflow server --serve-artifacts`):
`PUT /api/2.0/mlflow-artifacts/artifacts/<experiment>/<run>/artifacts/<path>` takes the file's bytes
as the body, and `GET /api/2.0/mlflow-artifacts/artifacts?path=<dir>` lists a directory with each
file's size, which is how an upload is confirmed. Under MLflow's auth both need the device's user to
hold EDIT on the capture experiment (the run's UPDATE, granted through the experiment). The calls reuse
the follower's `RegistryClient`: its credentials, TLS, bounded answers, deadlines and stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

from arachne_mlflow.errors import RegistryError
from arachne_mlflow.server.pull.answers import object_of, text_field
from arachne_mlflow.server.pull.deadline_http import Deadline
from arachne_mlflow.server.pull.registry_client import API, RegistryClient

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
MAX_LISTED_FILES = 10_000  # files in one listed directory (the rest are not looked at)


class CaptureClient(RegistryClient):
    """A `RegistryClient` that also finds a run's artifact root and uploads and lists its files."""

    @classmethod
    def like(cls, registry: RegistryClient) -> CaptureClient:
        """A client with `registry`'s server, settings and stop event, on its own session."""
        clone = registry.clone()
        client = cls(clone.tracking_uri, clone.session)
        client.timeout, client.json_seconds, client.stop = clone.timeout, clone.json_seconds, registry.stop
        return client

    def artifact_root(self, run_id: str) -> str:
        """The proxy path (`<experiment>/<run>/artifacts`) of a run's artifacts."""
        route = f"{API}/runs/get"
        info = object_of(object_of(self._get_json(route, {"run_id": run_id}), "run", route), "info", route)
        uri = text_field(info, "artifact_uri", route)
        parts = urlsplit(uri)
        path = parts.path.strip("/")
        if parts.scheme != "mlflow-artifacts" or not path or ".." in path.split("/"):
            raise RegistryError(
                f"run {run_id} stores its artifacts at {uri[:200]!r}: a device uploads through the tracking server's "
                "artifact proxy, so start it with --serve-artifacts (artifact URIs mlflow-artifacts:/...)"
            )
        return path

    def upload(self, path: str, body: Any, size: int, seconds: float) -> None:
        """PUT `size` bytes read from `body` (a file-like object) to the proxy path `path`, within `seconds`."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with Deadline(seconds, self.stop) as bounds:
            response = self._send("PUT", f"{ARTIFACTS_API}/{quote(path)}", bounds, data=body, headers=headers)
            response.close()

    def file_sizes(self, directory: str) -> dict[str, int]:
        """The files of a proxy directory and their sizes in bytes."""
        route = ARTIFACTS_API
        files = self._get_json(route, {"path": directory}).get("files", [])
        if not isinstance(files, list):
            raise RegistryError(f"{route}: the tracking server's files is not a list")
        return dict(_sizes(files[:MAX_LISTED_FILES], route))


def _sizes(files: Iterable[Any], route: str) -> Iterable[tuple[str, int]]:
    for item in files:
        if not isinstance(item, dict) or item.get("is_dir"):
            continue
        size = item.get("file_size")  # (an int64: proto3 JSON may write it as a string)
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        if isinstance(item.get("path"), str) and isinstance(size, int) and not isinstance(size, bool):
            yield item["path"].rsplit("/", 1)[-1], size
        else:
            raise RegistryError(f"{route}: the tracking server listed a file without a path and a size")
