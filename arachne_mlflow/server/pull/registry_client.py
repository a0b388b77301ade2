"""The device's client of an MLflow tracking server: its REST API spoken with `requests`, never MLflow.

A device that follows a registry alias (`serve --follow`) needs only READ on the registered model:
it resolves the alias, then fetches each file through `/model-versions/get-artifact`, which the
server authorizes by the registered model (the `mlflow-artifacts` proxy routes would need READ on
the experiment as well). Credentials and TLS come from MLflow's own environment variables, applied
as MLflow applies them. Every answer is bounded in size, in parsed size (objects and arrays) and
in total time (`deadline_http`: whatever the sender's pace, and the follower's stop ends it at
once), every field is type-checked before use, and a file download resumes with an HTTP Range
request after a dropped link. An alias lookup answered with an ETag (by a cache in front) is
asked again with `If-None-Match`, and a 304 is the last answer again. Redirects are refused,
except a file download's to an artifact host the device was told to trust
(`ARACHNE_ARTIFACT_HOSTS`), where MLflow's credentials are not sent.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import requests

from arachne_mlflow.errors import (
    InvalidInputError,
    ModelNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    UnsafeArchiveError,
)
from arachne_mlflow.protocol import bounded_json
from arachne_mlflow.server.pull.answers import (
    ModelRef,
    ModelVersion,
    model_version,
    named,
    object_of,
    tag_list,
    tags_of,
    text_field,
)
from arachne_mlflow.server.pull.bodies import expired, read_capped, reason, response_range, write_body
from arachne_mlflow.server.pull.deadline_http import Deadline, GuardedAdapter
from arachne_mlflow.server.pull.tracking_env import (
    ARTIFACT_HOSTS_ENV,
    artifact_hosts,
    check_tracking_uri,
    origin,
    session_from_env,
)

API = "/api/2.0/mlflow"
ARTIFACT_ROUTE = "/model-versions/get-artifact"  # (MLflow serves it without the /api/2.0 prefix)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # seconds without a byte before a request is given up
JSON_SECONDS = 120.0  # a JSON answer's whole request, head and body, however slowly it arrives
MAX_JSON_BYTES = 8 * 1024**2
MAX_JSON_CONTAINERS = 20_000  # objects and arrays in one answer (each tag is one; a parser's memory grows with them)
MAX_ERROR_CHARS = 300
_REDIRECTS = (301, 302, 303, 307, 308)
_FILE_ANSWERS = (200, 206, 404, 416)


class RegistryClient:
    """The registry calls a following device makes, against one tracking server (`http(s)://host:port`)."""

    def __init__(self, tracking_uri: str, session: requests.Session | None = None):
        self.tracking_uri = check_tracking_uri(tracking_uri)
        self.session = session or requests.Session()
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, GuardedAdapter())
        self.session.headers["Accept-Encoding"] = "identity"
        self.timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
        self.json_seconds = JSON_SECONDS
        self.stop: threading.Event | None = None  # the follower's: set, it ends the request in progress
        self.artifact_hosts: frozenset[str] = frozenset()  # origins a file download may be redirected to
        self._plain: requests.Session | None = None  # (for them: no credentials)
        self._last_answers: dict[tuple, tuple[str, dict[str, Any]]] = {}  # (route, params) -> ETag, answer

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RegistryClient:
        """The tracking server of `MLFLOW_TRACKING_URI`, with MLflow's credential variables."""
        uri = environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise InvalidInputError(
                "following a registry needs its address: set MLFLOW_TRACKING_URI=http(s)://host:port"
            )
        client = cls(uri, session_from_env(environ))
        client.artifact_hosts = artifact_hosts(environ.get(ARTIFACT_HOSTS_ENV, ""))
        return client

    def clone(self) -> RegistryClient:
        """The same server and settings on a session of its own (a requests session is not for many threads)."""
        session = requests.Session()
        session.auth, session.verify, session.cert = self.session.auth, self.session.verify, self.session.cert
        session.headers.update(self.session.headers)
        clone = RegistryClient(self.tracking_uri, session)
        clone.timeout, clone.json_seconds, clone.artifact_hosts = self.timeout, self.json_seconds, self.artifact_hosts
        return clone

    def close(self) -> None:
        """Close the connections kept open."""
        self.session.close()
        if self._plain is not None:
            self._plain.close()

    @property
    def has_credentials(self) -> bool:
        return self.session.auth is not None or "Authorization" in self.session.headers

    # -- the registry ----------------------------------------------------------------------
    def resolve(self, ref: ModelRef) -> ModelVersion:
        """The model version `ref` names now (an alias is looked up, a version fetched)."""
        if ref.alias is None:
            return self.get_version(ref.registered_model, str(ref.version))
        route = f"{API}/registered-models/alias"
        mv = model_version(self._conditional_json(route, {"name": ref.registered_model, "alias": ref.alias}), route)
        return named(mv, route, ref.registered_model)

    def get_version(self, name: str, version: str) -> ModelVersion:
        route = f"{API}/model-versions/get"
        return named(
            model_version(self._get_json(route, {"name": name, "version": version}), route), route, name, version
        )

    # -- this device's record (protocol/device_records.py) ---------------------------------
    def experiment_id(self, name: str, create: bool) -> str | None:
        """The id of the experiment `name`; when it does not exist yet, created (`create`) or None."""
        route = f"{API}/experiments/get-by-name"
        data = self._get_json(route, {"experiment_name": name}, missing_ok=True)
        if data is None:
            if not create:
                return None
            data = self._post_json(f"{API}/experiments/create", {"name": name})
            return text_field(data, "experiment_id", route)
        return text_field(object_of(data, "experiment", route), "experiment_id", route)

    def find_run(self, experiment_id: str, filter_string: str) -> str | None:
        """The id of an active run of the experiment that `filter_string` matches, if there is one."""
        route = f"{API}/runs/search"
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1}
        runs = self._post_json(route, body).get("runs", [])
        if not isinstance(runs, list):
            raise RegistryError(f"{route}: the tracking server's runs is not a list")
        return text_field(object_of(runs[0], "info", route), "run_id", route) if runs else None

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        route = f"{API}/runs/create"
        body = {"experiment_id": experiment_id, "run_name": run_name, "tags": tag_list(tags)}
        body["start_time"] = int(time.time() * 1000)
        return text_field(object_of(self._post_json(route, body), "run", route).get("info", {}), "run_id", route)

    def run_tags(self, run_id: str) -> dict[str, str] | None:
        """An active run's tags; None where the run is gone or deleted."""
        route = f"{API}/runs/get"
        data = self._get_json(route, {"run_id": run_id}, missing_ok=True)
        if data is None:
            return None
        run = object_of(data, "run", route)
        if object_of(run, "info", route).get("lifecycle_stage") != "active":
            return None
        return tags_of(object_of(run, "data", route).get("tags", []), route, "run.data.tags")

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Every tag in one request (`runs/log-batch`)."""
        self._post_json(f"{API}/runs/log-batch", {"run_id": run_id, "tags": tag_list(tags)})

    # -- files -----------------------------------------------------------------------------
    def fetch_artifact(
        self,
        name: str,
        version: str,
        path: str,
        dest: Path,
        work: Path,
        *,
        max_bytes: int,
        deadline: float,
        stop: threading.Event | None = None,
    ) -> int:
        """Download the file `path` of a model version to `dest`; its size in bytes.

        The bytes go to a partial file under `work` first and move to `dest` once complete, so a
        file at `dest` is always whole. A partial file left by a dropped link is resumed with
        `Range` (and `If-Range` with its ETag, so a file that changed restarts from zero).
        Raises `ModelNotFoundError` if the version has no such file, `UnsafeArchiveError` past
        `max_bytes`, `RegistryUnavailableError` when the link drops or `deadline` (monotonic) passes.
        """
        if dest.is_file():
            return dest.stat().st_size
        partial, etag_file = work / "data" / quote(path, safe=""), work / "etag" / quote(path, safe="")
        for directory in (partial.parent, etag_file.parent, dest.parent):
            directory.mkdir(parents=True, exist_ok=True)
        params = {"name": name, "version": version, "path": path}
        for _ in range(2):  # a partial file the server no longer matches (416, a wrong range) restarts once
            have = partial.stat().st_size if partial.is_file() else 0
            etag = etag_file.read_text() if have and etag_file.is_file() else ""
            headers = {"Range": f"bytes={have}-", "If-Range": etag} if have and etag else {}
            with Deadline(deadline - time.monotonic(), stop or self.stop) as bounds:
                response = self._send(
                    "GET", ARTIFACT_ROUTE, bounds, ok=_FILE_ANSWERS + _REDIRECTS, params=params, headers=headers
                )
                if response.status_code in _REDIRECTS:
                    response = self._redirected(response, bounds, headers)
                with response:
                    if response.status_code == 404:
                        raise ModelNotFoundError(f"model version {name}/{version} has no file {path!r} in the registry")
                    offset, total = response_range(response, have)
                    if offset is None:
                        partial.unlink(missing_ok=True)
                        etag_file.unlink(missing_ok=True)
                        continue
                    if total is not None and total > max_bytes:
                        partial.unlink(missing_ok=True)
                        raise UnsafeArchiveError(f"file {path!r} is {total} bytes, over the limit of {max_bytes} bytes")
                    etag_file.write_text(response.headers.get("ETag", ""))
                    size = write_body(response, partial, offset, path, max_bytes, bounds)
            if total is not None and size != total:
                raise RegistryUnavailableError(f"the download of {path!r} stopped after {size} of {total} bytes")
            os.replace(partial, dest)
            etag_file.unlink(missing_ok=True)
            return size
        raise RegistryError(f"the tracking server answered a range of {path!r} that does not match the file")

    # -- HTTP ------------------------------------------------------------------------------
    def _get_json(self, route: str, params: dict[str, str], missing_ok: bool = False) -> Any:
        """The JSON object the server answers, read within `json_seconds` and bounded before it is parsed
        (None for a 404 when `missing_ok`)."""
        return self._json("GET", route, missing_ok, params=params)

    def _post_json(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", route, False, json=body)

    def _conditional_json(self, route: str, params: dict[str, str]) -> dict[str, Any]:
        """`_get_json`, asked with the ETag of the last answer where there was one: a 304 is that answer again."""
        key = (route, tuple(sorted(params.items())))
        etag, last = self._last_answers.get(key, ("", None))
        headers = {"If-None-Match": etag} if etag and last is not None else {}
        answer: dict[str, str] = {}
        data = self._json("GET", route, False, params=params, headers=headers, etag=answer)
        if data is None:  # 304: not modified
            return last
        if answer.get("etag"):
            self._last_answers[key] = (answer["etag"], data)
        else:
            self._last_answers.pop(key, None)
        return data

    def _json(self, method: str, route: str, missing_ok: bool, etag: dict | None = None, **kwargs: Any) -> Any:
        ok = (200, 404) if missing_ok else (200, 304) if etag is not None and kwargs.get("headers") else (200,)
        with Deadline(self.json_seconds, self.stop) as bounds:
            with self._send(method, route, bounds, ok=ok, **kwargs) as response:
                if response.status_code in (304, 404):
                    return None
                if etag is not None:
                    etag["etag"] = response.headers.get("ETag", "")[:1024]
                body = read_capped(response, MAX_JSON_BYTES, route, bounds)
        try:
            data = bounded_json.loads(
                body,
                f"{route}: the tracking server's answer",
                max_bytes=MAX_JSON_BYTES,
                max_containers=MAX_JSON_CONTAINERS,
            )
        except InvalidInputError as err:
            raise RegistryError(str(err)) from err
        if not isinstance(data, dict):
            raise RegistryError(f"{route}: the tracking server's answer is not a JSON object")
        return data

    def _redirected(self, response: requests.Response, bounds: Deadline, headers: dict[str, str]) -> requests.Response:
        """The answer of the artifact host a download was redirected to, if the device trusts it; asked
        without MLflow's credentials (and not redirected further)."""
        with response:
            location = urljoin(response.url, response.headers.get("Location", ""))
        host = origin(location)
        if host not in self.artifact_hosts:
            raise RegistryError(
                f"the tracking server {self.tracking_uri} redirected a download to {host[:200]!r}, which is not a "
                f"trusted artifact host (name it in {ARTIFACT_HOSTS_ENV} to follow it)"
            )
        if self._plain is None:
            self._plain = requests.Session()
            for scheme in ("http://", "https://"):
                self._plain.mount(scheme, GuardedAdapter())
            self._plain.verify, self._plain.trust_env = self.session.verify, False
            self._plain.headers["Accept-Encoding"] = "identity"
        return self._send("GET", "", bounds, ok=_FILE_ANSWERS, headers=headers, url=location, session=self._plain)

    def _send(
        self,
        method: str,
        route: str,
        bounds: Deadline | None = None,
        ok: tuple[int, ...] = (200,),
        url: str | None = None,
        session: requests.Session | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One request, streamed; an answer outside `ok` becomes the matching `RegistryError`."""
        try:
            response = (session or self.session).request(
                method,
                url or self.tracking_uri + route,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
                **kwargs,
            )
        except requests.RequestException as err:
            raise self._failure(err, bounds, f"{method} {route}") from err
        if response.status_code in ok:
            return response
        with response:
            raise self._error(method, route, response)

    def _failure(self, err: requests.RequestException, bounds: Deadline | None, what: str) -> RegistryError:
        """The error a request that got no answer raises: the one table of transport failures."""
        if bounds is not None and bounds.check() is not None:
            return expired(bounds, what)
        if isinstance(err, requests.exceptions.SSLError):
            return RegistryError(
                f"TLS with the tracking server {self.tracking_uri} failed: {err}; set MLFLOW_TRACKING_SERVER_CERT_PATH "
                "to the CA bundle that signed its certificate"
            )
        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return RegistryUnavailableError(f"the tracking server {self.tracking_uri} cannot be reached: {reason(err)}")
        return RegistryError(f"request to the tracking server {self.tracking_uri} failed: {err}")

    def _error(self, method: str, route: str, response: requests.Response) -> RegistryError:
        status = response.status_code
        message = _error_message(response)
        where = f"the tracking server {self.tracking_uri}"
        if status == 401:
            given = "refused the credentials" if self.has_credentials else "asks for credentials and none were set"
            return RegistryAuthError(
                f"{where} {given} (401 Unauthorized): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN)",
                status,
            )
        if status == 403:
            return RegistryAuthError(f"{where} denied {method} {route} (403 Permission denied): {message}", status)
        if status == 429 or status >= 500:
            return RegistryUnavailableError(f"{where} answered {status} to {method} {route}: {message}")
        if 300 <= status < 400:
            return RegistryError(f"{where} redirected {method} {route} ({status}); redirects are not followed")
        return RegistryError(f"{where} answered {status} to {method} {route}: {message}")


def _error_message(response: requests.Response) -> str:
    """MLflow's `error_code: message` (or the start of a plain-text body), bounded and on one line."""
    try:
        raw = next(response.iter_content(4096), b"")
    except requests.RequestException:
        raw = b""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "message" in data:
            text = f"{data.get('error_code', '')}: {data['message']}".lstrip(": ")
    except ValueError:
        pass
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())  # (basic-auth answers in HTML)
    return text[:MAX_ERROR_CHARS] or response.reason or ""
