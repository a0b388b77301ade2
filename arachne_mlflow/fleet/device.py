"""A device server as a fleet names it: its address (`host:port`, `[v6]:port`) and the fleet file's settings for it.

Read by the deployments plugin and by the remote runtime alike, so it imports neither MLflow nor a DNN library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from arachne_mlflow.client.address import authority
from arachne_mlflow.errors import InvalidInputError

SCHEME = "arachne-jetson"  # the target scheme whose URIs name devices (an error shows the form to use)
DEFAULT_PORT = 5051
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class Device:
    """One device server. `name` is its name in the fleet file (None for a bare `host:port`);
    `token_env`, `tls` and `ca_cert` are the fleet file's settings for it (None: not set there)."""

    host: str
    port: int
    name: str | None = None
    token_env: str | None = field(default=None, compare=False)
    tls: bool | None = field(default=None, compare=False)
    ca_cert: str | None = field(default=None, compare=False)
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def address(self) -> str:
        return authority(self.host, self.port)

    def __str__(self) -> str:
        return self.name or self.address


def split_address(part: str, where: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port` as (host, port or None); `where` says what to name in an error."""
    match = _HOST_PORT.match(part)
    port = int(match["port"]) if match and match["port"] else None
    if not match or (port is not None and not 0 < port < 65536):
        raise InvalidInputError(f"{where}: {part!r} is not host:port; use {SCHEME}://host:port[,host:port...]")
    return match["ip6"] or match["host"], port


def parse_address(part: str, where: str) -> Device:
    host, port = split_address(part, where)
    return Device(host, port or DEFAULT_PORT)
