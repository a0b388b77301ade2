"""The one HTTP client of the device server, used by the remote runtime and the deployments plugin.

    from arachne_mlflow.client import DeviceClient
    with DeviceClient("jetson.local", 5051, token="...") as device:
        device.upload_model("mobilenet", "path/to/mlflow/model")     # skipped if already there
        outputs = device.infer("mobilenet", {"input": x})            # dict name -> ndarray

One keep-alive `requests.Session` for control calls, and for `infer` a pool of leaner keep-alive
connections (`transport.py`); tensors travel as Triton binary data; uploads stream a tar built on
the fly. Every failure is an `ArachneError`: `DeviceUnreachableError` (naming host and port) when
the server cannot be reached, otherwise the error type of the server's status.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from arachne_mlflow.client.address import authority, base_url, socket_host
from arachne_mlflow.client.failures import unreachable
from arachne_mlflow.client.shared_memory import InputRegion
from arachne_mlflow.client.transport import Transport
from arachne_mlflow.errors import (
    ArachneError,
    ConflictError,
    InsufficientStorageError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnauthorizedError,
    UntrustedModelError,
)
from arachne_mlflow.model.archive import stream_tar, tar_size
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.names import check_name
from arachne_mlflow.protocol import codec

_logger = logging.getLogger(__name__)
PROVENANCE_HEADER = "Arachne-Provenance"
HOW_TO_SEND_A_TOKEN = (
    "set ARACHNE_TOKEN to the token the device was started with (serve --token), or pass it "
    "(rpc_info 'token', -C token=, or the variable the fleet file's token_env names)"
)
_HEADER_LENGTH_KEY = codec.HEADER_LENGTH.lower().encode()
_JSON_HEADERS = b"Content-Type: application/json\r\n"
_BINARY_HEADERS = f"{codec.HEADER_LENGTH}: %d\r\n".encode()  # (tritonclient sends no Content-Type either)
_ERRORS = {
    400: InvalidInputError,
    401: UnauthorizedError,
    403: UntrustedModelError,  # a device that requires signed models (serve --trust-key) refused one
    404: ModelNotFoundError,
    409: ConflictError,
    413: InvalidInputError,
    503: ModelNotReadyError,
    507: InsufficientStorageError,
}


class DeviceClient:
    """A connection to one device server (`host:port`), over HTTP or HTTPS.

    `token` is the server's bearer token; `tls=True` uses HTTPS, verified against `ca_cert`
    (a PEM file) or the system CAs, unless `verify=False`. `connect_timeout` bounds opening a
    connection (a device that is off or unreachable fails fast), `timeout` the wait for each
    answer (seconds); `upload_timeout` bounds uploads, which include loading the model on the
    server. `host` may be a name, an IPv4 or an IPv6 literal (`::1` or `[::1]`).
    `trust_env` lets requests read proxies and .netrc from the environment; it is off because a
    device is usually on the local network, and those look-ups cost time on every call. `name`
    (a fleet file's name for the device) is how errors name it, beside its address.
    `shared_memory` (default: `$ARACHNE_SHARED_MEMORY`) sends inputs through system shared memory
    when the host is loopback and the server has the extension (client/shared_memory.py); otherwise,
    or if registering fails, they travel in the request as usual.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 5051,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike | None = None,
        verify: bool = True,
        timeout: float = 60.0,
        upload_timeout: float = 600.0,
        trust_env: bool = False,
        connect_timeout: float = 3.0,
        name: str | None = None,
        shared_memory: bool | None = None,
    ):
        import requests

        self.host, self.port = socket_host(host), int(port)
        self.address = authority(self.host, self.port)
        self.where = f"device {name} ({self.address})" if name else f"device server at {self.address}"
        self.url = base_url(self.host, self.port, tls)
        self.timeout, self.upload_timeout, self.connect_timeout = timeout, upload_timeout, connect_timeout
        self._requests = requests
        self._session = requests.Session()
        self._session.trust_env = trust_env
        # passed with every request: a session-level verify loses to $REQUESTS_CA_BUNDLE in requests
        self._verify = os.fspath(ca_cert) if ca_cert is not None else verify
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._session.headers.update(self._auth)
        self._input_names: dict[str, list[str]] = {}
        self._infer_paths: dict[str, str] = {}
        self._shared_memory = _wants_shared_memory(shared_memory, self.host)
        self._input_region: InputRegion | None = None
        self._region_lock = threading.Lock()  # one request at a time writes the region
        self._transport = Transport(
            self.host,
            self.port,
            timeout,
            _ssl_context(ca_cert, verify) if tls else None,
            headers=self._auth,
            connect_timeout=connect_timeout,
            where=self.where,
        )

    # -- health and metadata ---------------------------------------------------------------
    def live(self) -> bool:
        """True when the server answers its liveness check (`DeviceUnreachableError` if nothing answers)."""
        return self._send("GET", "/v2/health/live", check=False).status_code == 200

    def ready(self) -> bool:
        """True when the server has loaded its store and takes requests."""
        return self._send("GET", "/v2/health/ready", check=False).status_code == 200

    def server_metadata(self, timeout: float | None = None) -> dict[str, Any]:
        """Name, version, extensions, platform, CPU arch and available runtimes of the server
        (`timeout`: wait longer than for other calls, as a device may look its runtimes up first)."""
        return self._send("GET", "/v2", timeout=timeout).json()

    def model_metadata(self, name: str) -> dict[str, Any]:
        """The model's inputs and outputs (`name`, V2 `datatype`, `shape` with -1 for dynamic)."""
        return self._send("GET", f"/v2/models/{_quote(name)}").json()

    def model_ready(self, name: str) -> bool:
        return self._send("GET", f"/v2/models/{_quote(name)}/ready", check=False).status_code == 200

    # -- repository ------------------------------------------------------------------------
    def repository_index(self) -> list[dict[str, Any]]:
        """Every model on the server: `name`, `version`, `state` (READY/UNAVAILABLE), `reason`."""
        return self._send("POST", "/v2/repository/index", data=b"{}").json()

    def model_record(self, name: str) -> dict[str, Any] | None:
        """The stored record of a model (`revision`, `runtime`, `digest`, `uploaded_at`, `provenance`,
        `state`), or None when the server has no such model."""
        try:
            return self._send("GET", f"/v2/repository/models/{_quote(name)}").json()
        except ModelNotFoundError:
            return None

    def upload_model(
        self,
        name: str,
        model_dir: str | os.PathLike,
        files: Sequence[str] | None = None,
        provenance: Mapping[str, Any] | None = None,
        progress: bool = False,
        force: bool = False,
    ) -> bool:
        """Upload the MLflow model directory `model_dir` as `name` and have the server load it.

        Only `files` are sent (default: what MLmodel names, `ArachneModel.files()`), as a tar
        streamed from disk. `provenance` (a small JSON object: model URI, registered model name,
        version, run id) is stored beside the model. Returns False, sending nothing, when the server already
        holds the same files under `name` (unless `force`). A replaced model keeps serving on
        the server until the new one has loaded.
        """
        model_dir = Path(model_dir)
        if files is None:
            from arachne_mlflow.model.directory import read_model_dir

            files = read_model_dir(model_dir).files()
        files = sorted(set(files))
        if not force:
            stored = self.model_record(name)
            if stored is not None and stored.get("digest") == files_digest(model_dir, files):
                return False
        body: Iterator[bytes] = stream_tar(model_dir, files)
        if progress:
            body = _with_progress(body, tar_size(model_dir, files), f"upload {name}")
        headers = {"Content-Type": "application/x-tar"}
        if provenance is not None:
            headers[PROVENANCE_HEADER] = json.dumps(dict(provenance))
        self._input_names.pop(name, None)
        self._send(
            "PUT", f"/v2/repository/models/{_quote(name)}", data=body, headers=headers, timeout=self.upload_timeout
        )
        return True

    def rollback_model(self, name: str) -> dict[str, Any]:
        """Serve the version of `name` that its last upload replaced again, from the device's disk
        (no upload); returns the new record. `ConflictError` when the device keeps no previous version."""
        self._input_names.pop(name, None)
        path = f"/v2/repository/models/{_quote(name)}/rollback"
        return self._send("POST", path, data=b"{}", timeout=self.upload_timeout).json()

    def delete_model(self, name: str) -> None:
        self._input_names.pop(name, None)
        self._send("DELETE", f"/v2/repository/models/{_quote(name)}")

    def capture_rules(self, name: str) -> dict[str, Any]:
        """The field-capture rules in force for `name` on the device: `{"model", "source", "rules"}`."""
        return self._send("GET", f"/v2/repository/models/{_quote(name)}/capture").json()

    def set_capture_rules(self, name: str, rules: Mapping[str, Any]) -> dict[str, Any]:
        """Set the device's field-capture rules for `name` (`{}`: off; docs/capture.md)."""
        return self._send("PUT", f"/v2/repository/models/{_quote(name)}/capture", json=dict(rules)).json()

    def load_model(self, name: str) -> None:
        self._send("POST", f"/v2/repository/models/{_quote(name)}/load", data=b"{}", timeout=self.upload_timeout)

    def unload_model(self, name: str) -> None:
        self._send("POST", f"/v2/repository/models/{_quote(name)}/unload", data=b"{}")

    # -- inference -------------------------------------------------------------------------
    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any] | Sequence[Any],
        outputs: Sequence[str] | None = None,
        binary: bool = True,
    ) -> dict[str, np.ndarray]:
        """Run model `name` once; returns its outputs by name (only `outputs` when given).

        `inputs` is a dict name -> array, or a list in the model's input order. With `binary`
        (the default) tensors travel as raw bytes, exactly; otherwise as JSON numbers.
        """
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            names = self._model_input_names(name)
            if len(inputs) != len(names):
                raise InvalidInputError(f"model {name!r} takes {len(names)} inputs {names}, got {len(inputs)}")
            inputs = dict(zip(names, inputs))
        path = self._infer_paths.get(name)
        if path is None:
            path = self._infer_paths[name] = f"/v2/models/{_quote(name)}/infer"
        if self._shared_memory and binary and outputs is None:
            with self._region_lock:
                region = self._region()
                if region is not None:
                    return self._post_infer(path, [region.request(inputs)], None)
        body, header_length = codec.request_parts(inputs, binary=binary, outputs=outputs)
        return self._post_infer(path, body, header_length)

    def _post_infer(self, path: str, body: list, header_length: int | None) -> dict[str, np.ndarray]:
        headers = _JSON_HEADERS if header_length is None else _BINARY_HEADERS % header_length
        status, response_headers, content = self._transport.post(path, body, headers)
        if status >= 400:
            raise _error(status, content, self.address)
        return codec.decode_response(content, response_headers.get(_HEADER_LENGTH_KEY))

    # -- system shared memory (Triton's extension) -----------------------------------------
    def register_shared_memory(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        """Register `byte_size` bytes at `offset` of POSIX shared memory object `key` as region `name`."""
        body = json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode()
        self._send("POST", f"/v2/systemsharedmemory/region/{_quote_region(name)}/register", data=body)

    def unregister_shared_memory(self, name: str | None = None) -> None:
        """Unregister region `name`, or every region (of every client) when None."""
        where = f"/region/{_quote_region(name)}" if name is not None else ""
        self._send("POST", f"/v2/systemsharedmemory{where}/unregister", data=b"")

    def shared_memory_status(self) -> list[dict[str, Any]]:
        return self._send("GET", "/v2/systemsharedmemory/status").json()

    def _region(self) -> InputRegion | None:
        """The input region, made at first use; None (and shared memory off) if the server lacks the
        extension or refuses the region."""
        if self._input_region is None:
            try:
                if "system_shared_memory" not in self.server_metadata().get("extensions", []):
                    self._shared_memory = False
                    return None
                region = InputRegion(self.register_shared_memory, self.unregister_shared_memory)
                region.ensure(0)  # creates and registers it
            except (ArachneError, OSError) as err:
                _logger.warning("%s: not using shared memory for inputs: %s", self.where, err)
                self._shared_memory = False
                return None
            self._input_region = region
        return self._input_region

    def benchmark(self, name: str, warmup: int = 1, repeat: int = 10, number: int = 1) -> dict[str, Any]:
        """Time the model on the server: `{"mean", "median", "std", "max", "min"}` in ms per run."""
        options = {"warmup": warmup, "repeat": repeat, "number": number}
        return self._send(
            "POST",
            f"/v2/models/{_quote(name)}/benchmark",
            data=json.dumps(options).encode(),
            timeout=self.upload_timeout,
        ).json()

    def metrics(self) -> str:
        """The server's Prometheus metrics, as text."""
        return self._send("GET", "/metrics").text

    # -- plumbing --------------------------------------------------------------------------
    def close(self) -> None:
        if self._input_region is not None:
            self._input_region.close()
            self._input_region = None
        self._session.close()
        self._transport.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceClient({self.url!r})"

    def _model_input_names(self, name: str) -> list[str]:
        if name not in self._input_names:
            self._input_names[name] = [t["name"] for t in self.model_metadata(name)["inputs"]]
        return self._input_names[name]

    def _send(self, method: str, path: str, check: bool = True, timeout: float | None = None, **kwargs: Any):
        try:
            response = self._session.request(
                method,
                self.url + path,
                timeout=(self.connect_timeout, timeout or self.timeout),
                verify=self._verify,
                **kwargs,
            )
        except (self._requests.exceptions.ConnectionError, self._requests.exceptions.Timeout) as err:
            raise unreachable(self.where, err) from err
        if check and response.status_code >= 400:
            raise _error(response.status_code, response.content, self.address)
        return response


def _wants_shared_memory(option: bool | None, host: str) -> bool:
    """Shared memory only to a server on this machine, when asked (the option, else the environment)."""
    if option is None:
        option = os.environ.get("ARACHNE_SHARED_MEMORY", "").strip().lower() in {"1", "true", "yes", "on"}
    if not option:
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quote_region(name: str) -> str:
    return quote(name, safe="")


def _quote(name: str) -> str:
    """A valid model name as a path segment (checked here: the server would see '/' as a path)."""
    return quote(check_name(name), safe="")


def _error(status: int, content: bytes, where: str) -> ArachneError:
    """The error for a failed request: the server's `{"error": ...}` message, typed by status."""
    try:
        message = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        message = content[:500].decode("utf-8", errors="replace")
    error_class = _ERRORS.get(status, ArachneError)
    if status == 401:
        message += f"; {HOW_TO_SEND_A_TOKEN}"
    return error_class(f"device server {where}: {message} (HTTP {status})")


def _ssl_context(ca_cert: str | os.PathLike | None, verify: bool) -> ssl.SSLContext:
    """The same verification as the requests session: `ca_cert`, else system CAs, unless `verify=False`."""
    context = ssl.create_default_context(cafile=os.fspath(ca_cert) if ca_cert is not None else None)
    if ca_cert is None and not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _with_progress(chunks: Iterator[bytes], total: int, description: str) -> Iterator[bytes]:
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=description) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))
