"""Target URIs and config of the `arachne-jetson` deployments target: which devices, how to reach them.

arachne-jetson                               ARACHNE_DEVICE, default localhost:5051
arachne-jetson://jetson-1:5051               one device
arachne-jetson:/jetson-1:5051                the form `mlflow deployments` also accepts
arachne-jetson://jetson-1:5051,jetson-2      a fleet (the port defaults to 5051)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.errors import InvalidInputError

SCHEME = "arachne-jetson"
DEFAULT_DEVICE = "localhost:5051"
DEFAULT_PORT = 5051
CONNECTION_KEYS = ("token", "tls", "ca_cert", "timeout")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class Device:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Connection:
    """How to talk to every device of a target: token, TLS, CA bundle, timeout."""

    token: str | None = None
    tls: bool = False
    ca_cert: str | None = None
    timeout: float = 60.0


def parse_devices(target_uri: str) -> list[Device]:
    """The devices a target URI names, in order, without duplicates."""
    if target_uri != SCHEME and not target_uri.startswith(SCHEME + ":"):
        raise InvalidInputError(f"target {target_uri!r} is not an {SCHEME} target")
    rest = target_uri[len(SCHEME) :].lstrip(":").lstrip("/")
    if not rest:
        rest = os.environ.get("ARACHNE_DEVICE") or DEFAULT_DEVICE
    devices: list[Device] = []
    for part in rest.split(","):
        part = part.strip().rstrip("/")
        match = _HOST_PORT.match(part)
        port = int(match["port"]) if match and match["port"] else DEFAULT_PORT
        if not match or not 0 < port < 65536:
            raise InvalidInputError(
                f"target {target_uri!r}: {part!r} is not host:port; use {SCHEME}://host:port[,host:port...]"
            )
        device = Device(match["ip6"] or match["host"], port)
        if device not in devices:
            devices.append(device)
    return devices


def flag(name: str, value: Any, default: bool) -> bool:
    """The yes/no setting `name` given as a string (`-C tls=true`) or a bool; `default` when not given."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE | _FALSE:
        raise InvalidInputError(f"config {name} must be true or false, got {value!r}")
    return text in _TRUE


def connection(config: Mapping[str, Any] | None, other_keys: Iterable[str] = ()) -> Connection:
    """Token, TLS and timeout from `config` (`-C key=value`, strings) or the environment.

    A key that is neither a connection setting nor one of `other_keys` is refused: a typo
    must not silently mean "no token".
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONNECTION_KEYS) - set(other_keys))
    if unknown:
        raise InvalidInputError(f"unknown config {unknown}; known: {sorted({*CONNECTION_KEYS, *other_keys})}")
    token = config.get("token") or os.environ.get("ARACHNE_TOKEN") or None
    tls = flag("tls", config.get("tls", os.environ.get("ARACHNE_TLS")), False)
    ca_cert = config.get("ca_cert") or os.environ.get("ARACHNE_CA_CERT") or None
    try:
        timeout = float(config.get("timeout", os.environ.get("ARACHNE_TIMEOUT", 60)))
    except ValueError as err:
        raise InvalidInputError(f"config timeout must be a number of seconds, got {config.get('timeout')!r}") from err
    return Connection(token=token, tls=tls, ca_cert=ca_cert, timeout=timeout)
