"""A device's capture routes, as the host drains them: list, download, delete a model's closed segments,
and close the open one. Answers are bounded (a listing's size, a segment's bytes, each wait), a
download is paced by the bandwidth cap and written to a file named as the segment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from arachne_mlflow.client.address import base_url
from arachne_mlflow.errors import (
    ArachneError,
    DeviceUnreachableError,
    InvalidInputError,
    ModelNotFoundError,
    UnauthorizedError,
)
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.model.names import check_name
from arachne_mlflow.protocol import bounded_json
from arachne_mlflow.protocol.capture_format import SEGMENT_PATTERN
from arachne_mlflow.server.pull.throttle import TokenBucket

MAX_LISTING_BYTES = 4 * 1024**2
CHUNK = 1 << 16


class DeviceSegments:
    """The capture routes of one device (`/v2/capture/{model}/...`), with the fleet's token and TLS."""

    def __init__(self, device: Device, connection: Connection, max_segment_bytes: int, max_bps: float | None = None):
        conn = connection.for_device(device)
        self.where = f"device {device.name or device.address}"
        self.url = base_url(device.host, device.port, conn.tls) + "/v2"
        self.session = requests.Session()
        self.session.trust_env = False
        if conn.token:
            self.session.headers["Authorization"] = f"Bearer {conn.token}"
        self.session.headers["Accept-Encoding"] = "identity"
        self.verify: Any = conn.ca_cert or True
        self.timeout = (conn.connect_timeout, conn.timeout)
        self.max_segment_bytes, self.max_bps = max_segment_bytes, max_bps

    def close(self) -> None:
        self.session.close()

    def rollover(self, model: str) -> None:
        self._send("POST", f"/capture/{_name(model)}/rollover").close()

    def record(self, model: str) -> dict[str, Any] | None:
        """The model's store record (its revisions' provenance), None where it holds no such model."""
        try:
            found = self._json(f"/repository/models/{_name(model)}", "its record of the model")
        except ModelNotFoundError:
            return None
        return found if isinstance(found, dict) else None

    def closed(self, model: str) -> list[str]:
        """The names of the model's closed segments, oldest first."""
        listed = self._json(f"/capture/{_name(model)}/segments", "its list of segments")
        items = listed.get("segments") if isinstance(listed, dict) else listed
        names = [item.get("name") if isinstance(item, dict) else item for item in items or []]
        return sorted(name for name in names if isinstance(name, str) and SEGMENT_PATTERN.fullmatch(name))

    def download(self, model: str, segment: str, directory: Path) -> Path:
        """The segment, written to `directory/<segment>` (within the size limit, paced by the cap)."""
        path = directory / _segment(segment)
        bucket = TokenBucket(self.max_bps) if self.max_bps else None
        size = 0
        with self._send("GET", f"/capture/{_name(model)}/segments/{segment}") as response, open(path, "wb") as file:
            while chunk := response.raw.read(bucket.take(CHUNK) if bucket else CHUNK, decode_content=False):
                size += len(chunk)
                if size > self.max_segment_bytes:
                    raise ArachneError(f"{self.where}: segment {segment} is over {self.max_segment_bytes} bytes")
                file.write(chunk)
        return path

    def delete(self, model: str, segment: str) -> None:
        self._send("DELETE", f"/capture/{_name(model)}/segments/{_segment(segment)}").close()

    def _json(self, path: str, what: str) -> Any:
        with self._send("GET", path) as response:
            body = response.raw.read(MAX_LISTING_BYTES + 1, decode_content=False)
        if len(body) > MAX_LISTING_BYTES:
            raise ArachneError(f"{self.where}: {what} is over {MAX_LISTING_BYTES} bytes")
        try:
            return bounded_json.loads(body, f"{self.where}: {what}", max_bytes=MAX_LISTING_BYTES)
        except InvalidInputError as err:
            raise ArachneError(str(err)) from err

    def _send(self, method: str, path: str) -> requests.Response:
        try:
            response = self.session.request(
                method, self.url + path, timeout=self.timeout, verify=self.verify, stream=True, allow_redirects=False
            )
        except requests.RequestException as err:
            raise DeviceUnreachableError(f"{self.where} cannot be reached: {type(err).__name__}") from err
        if response.status_code < 300:
            return response
        with response:
            message = response.raw.read(500, decode_content=False).decode("utf-8", "replace")
        kind = {401: UnauthorizedError, 404: ModelNotFoundError}.get(response.status_code, ArachneError)
        raise kind(f"{self.where}: {method} /v2{path} answered {response.status_code}: {message}")


def _name(model: str) -> str:
    return quote(check_name(model), safe="")


def _segment(name: str) -> str:
    if not SEGMENT_PATTERN.fullmatch(name):
        raise InvalidInputError(f"{name[:100]!r} is not a capture segment name")
    return name
