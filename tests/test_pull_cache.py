"""Pull mode behind a cache: real nginx running the shipped examples/pull-cache/nginx.conf in front of a
real basic-auth `mlflow server`; and a download redirected to an artifact host the device trusts."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import requests

from arachne_mlflow.errors import InvalidInputError, RegistryError
from arachne_mlflow.server.pull.registry_client import ModelRef, RegistryClient, artifact_hosts, session_from_env
from tests.helpers.mlflow_server import ADMIN, MlflowServer
from tests.helpers.nginx import Nginx
from tests.test_pull import READER, _client, _register, _unique, pull_models  # noqa: F401 (a fixture)

ARTIFACT = "/model-versions/get-artifact"


@pytest.fixture
def cached_registry(tmp_path, pull_models, monkeypatch):  # noqa: F811
    """A basic-auth tracking server with a model the reader may READ, and nginx in front of it."""
    dirs, _ = pull_models
    server = MlflowServer(tmp_path / "mlflow", basic_auth=True).start()
    proxy = None
    try:
        registered = _unique("cached")
        with monkeypatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
            patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
            client = _client(server.url)
            client.set_registered_model_alias(registered, "prod", _register(client, registered, dirs["v1"]))
        for route, body in (
            ("/api/2.0/mlflow/users/create", {"username": READER[0], "password": READER[1]}),
            (
                "/api/3.0/mlflow/users/permissions/grant",
                {"username": READER[0], "resource_type": "registered_model", "resource_id": registered}
                | {"permission": "READ"},
            ),
        ):
            assert requests.post(server.url + route, json=body, auth=ADMIN, timeout=30).status_code == 200
        proxy = Nginx(tmp_path / "nginx", server.port).start()
        yield server, proxy, registered, dirs["v1"]
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def _reader(url: str) -> RegistryClient:
    return RegistryClient(
        url, session_from_env({"MLFLOW_TRACKING_USERNAME": READER[0]} | {"MLFLOW_TRACKING_PASSWORD": READER[1]})
    )


def _fetch(client, registered, path, dest: Path, work: Path) -> bytes:
    client.fetch_artifact(registered, "1", path, dest, work, max_bytes=10**8, deadline=10**12)
    return dest.read_bytes()


@pytest.mark.slow
def test_the_proxy_serves_repeated_downloads_without_the_tracking_server(cached_registry, tmp_path):
    server, proxy, registered, model_dir = cached_registry
    device = _reader(proxy.url)
    assert device.resolve(ModelRef(registered, alias="prod")).version == "1"
    expected = (model_dir / "model.onnx").read_bytes()
    assert _fetch(device, registered, "model.onnx", tmp_path / "a" / "model.onnx", tmp_path / "wa") == expected
    params = {"name": registered, "version": "1", "path": "model.onnx"}
    again = requests.get(proxy.url + ARTIFACT, params=params, auth=READER, timeout=30)
    assert again.status_code == 200 and again.headers["X-Cache-Status"] == "HIT" and again.content == expected
    assert "immutable" in again.headers["Cache-Control"]
    wrong = requests.get(proxy.url + ARTIFACT, params=params, auth=(READER[0], "not-the-password"), timeout=30)
    assert wrong.status_code == 401 and wrong.content != expected  # the cache is keyed on the credentials too
    alias = {"name": registered, "alias": "prod"}
    for _ in range(2):
        answer = requests.get(proxy.url + "/api/2.0/mlflow/registered-models/alias", params=alias, auth=READER)
    assert answer.status_code == 200 and answer.headers["X-Cache-Status"] == "HIT"

    server.stop()  # the tracking server is gone: the files still come, whole and by range
    assert _fetch(device, registered, "model.onnx", tmp_path / "b" / "model.onnx", tmp_path / "wb") == expected
    ranged = requests.get(proxy.url + ARTIFACT, params=params, auth=READER, headers={"Range": "bytes=10-"}, timeout=30)
    assert ranged.status_code == 206 and ranged.content == expected[10:]
    assert ranged.headers["Content-Range"] == f"bytes 10-{len(expected) - 1}/{len(expected)}"
    refused = requests.get(proxy.url + ARTIFACT, params=params, auth=(READER[0], "not-the-password"), timeout=30)
    assert refused.status_code == 502  # never served from the reader's cached copy
    nothing = requests.get(proxy.url + ARTIFACT, params=params, timeout=30)
    assert nothing.status_code == 502


class _Front(http.server.BaseHTTPRequestHandler):
    """A tracking server that sends every download to another host (its `target`)."""

    target = ""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.target + "/files/model.onnx")
        self.end_headers()

    def log_message(self, *args):
        pass


class _ArtifactHost(http.server.BaseHTTPRequestHandler):
    """An artifact host that remembers the headers it was sent."""

    seen: list = []
    body = b"the model's bytes" * 100

    def do_GET(self):
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_download_follows_a_redirect_only_to_a_trusted_host_and_without_the_credentials(tmp_path):
    host = _serve(_ArtifactHost)
    origin = f"http://127.0.0.1:{host.server_port}"
    front = _serve(type("Front", (_Front,), {"target": origin}))
    clients = []
    try:
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{front.server_port}"}
        env |= {"MLFLOW_TRACKING_USERNAME": READER[0], "MLFLOW_TRACKING_PASSWORD": READER[1]}
        untrusting = RegistryClient.from_env(env)
        with pytest.raises(RegistryError, match="not a trusted artifact host"):
            _fetch(untrusting, "m", "model.onnx", tmp_path / "a" / "model.onnx", tmp_path / "wa")
        assert _ArtifactHost.seen == []
        trusting = RegistryClient.from_env(env | {"ARACHNE_ARTIFACT_HOSTS": f"https://cdn.example.com, {origin}/"})
        clients += [untrusting, trusting, trusting.clone()]
        assert _fetch(clients[-1], "m", "model.onnx", tmp_path / "b" / "model.onnx", tmp_path / "wb") == (
            _ArtifactHost.body
        )
        (headers,) = _ArtifactHost.seen
        assert "Authorization" not in headers and "authorization" not in {k.lower() for k in headers}
        with pytest.raises(RegistryError, match="redirects are not followed"):
            trusting.resolve(ModelRef("m", alias="prod"))  # only a file download follows one
    finally:
        for client in clients:
            client.close()
        for server in (front, host):
            server.shutdown()
            server.server_close()
    for bad in ("ftp://x", "https://user@host", "https://host/path", "host:443"):
        with pytest.raises(InvalidInputError):
            artifact_hosts(bad)


class _Conditional(http.server.BaseHTTPRequestHandler):
    """An alias answer with an ETag, and 304 to a request that names it."""

    asked: list = []

    def do_GET(self):
        type(self).asked.append(self.headers.get("If-None-Match"))
        if self.headers.get("If-None-Match") == '"v1"':
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
            return
        body = b'{"model_version": {"name": "m", "version": "1", "status": "READY"}}'
        self.send_response(200)
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_alias_lookup_asks_with_the_etag_and_takes_304_as_the_same_answer():
    server = _serve(_Conditional)
    client = RegistryClient(f"http://127.0.0.1:{server.server_port}", session_from_env({}))
    try:
        versions = [client.resolve(ModelRef("m", alias="prod")).version for _ in range(3)]
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert versions == ["1", "1", "1"] and _Conditional.asked == [None, '"v1"', '"v1"']
