"""Where a following device's tracking server is and how it is reached, from the environment as MLflow
reads it: the tracking URI, credentials and TLS (MLflow's own variables), and the artifact hosts a
download may be redirected to (`ARACHNE_ARTIFACT_HOSTS`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import requests

from arachne_mlflow.errors import InvalidInputError

ARTIFACT_HOSTS_ENV = "ARACHNE_ARTIFACT_HOSTS"  # comma-separated https://host[:port] a download may be sent to
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def session_from_env(environ: Mapping[str, str] = os.environ) -> requests.Session:
    """A session with MLflow's credentials and TLS settings, as `mlflow` itself reads them.

    Basic auth (`MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD`) wins over a bearer token
    (`MLFLOW_TRACKING_TOKEN`); `MLFLOW_TRACKING_INSECURE_TLS` turns verification off,
    `MLFLOW_TRACKING_SERVER_CERT_PATH` names the CA bundle, `MLFLOW_TRACKING_CLIENT_CERT_PATH` a client certificate.
    """
    session = requests.Session()
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    token = environ.get("MLFLOW_TRACKING_TOKEN")
    if bool(user) != bool(password):
        raise InvalidInputError("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD go together: set both")
    if user and password:
        session.auth = (user, password)
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    insecure = env_bool(environ, "MLFLOW_TRACKING_INSECURE_TLS")
    ca_bundle = environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    if insecure and ca_bundle:
        raise InvalidInputError(
            "MLFLOW_TRACKING_INSECURE_TLS=true and MLFLOW_TRACKING_SERVER_CERT_PATH cannot both be set: "
            "verify against the CA bundle, or do not verify"
        )
    session.verify = ca_bundle or not insecure
    if client_cert := environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        session.cert = client_cert
    return session


def check_tracking_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(
            f"MLFLOW_TRACKING_URI={uri[:200]!r}: a following device talks to a tracking server over HTTP, "
            "http(s)://host:port (not a file, sqlite or databricks URI)"
        )
    if parts.username or parts.password:
        raise InvalidInputError(
            "MLFLOW_TRACKING_URI holds credentials: put them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if parts.query or parts.fragment:
        raise InvalidInputError(f"MLFLOW_TRACKING_URI={uri[:200]!r}: no query or fragment, just http(s)://host:port")
    return uri.rstrip("/")


def artifact_hosts(value: str) -> frozenset[str]:
    """The origins (`https://host:port`) of a comma-separated list of artifact hosts the device trusts."""
    hosts = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.path.strip("/"):
            raise InvalidInputError(f"{ARTIFACT_HOSTS_ENV}: {item[:200]!r} is not an origin, https://host[:port]")
        hosts.add(origin(item))
    return frozenset(hosts)


def origin(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return url
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def env_bool(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or not value:
        return False
    raise InvalidInputError(f"{name}={value!r}: use true or false")
