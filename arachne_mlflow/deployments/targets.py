"""Devices and settings of the `arachne-jetson` deployments target: what a target names, how to reach it.

arachne-jetson                               ARACHNE_DEVICE, default localhost:5051
arachne-jetson://jetson-1:5051               one device
arachne-jetson:/jetson-1:5051                the form `mlflow deployments` also accepts
arachne-jetson://jetson-1:5051,jetson-2      several devices (the port defaults to 5051)
arachne-jetson://cam-1,@lyon,@all            devices and groups of the fleet file (inventory.py)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from arachne_mlflow.client.address import authority
from arachne_mlflow.deployments.strategy import ROLLOUT_KEYS, Strategy, strategy_of
from arachne_mlflow.errors import InvalidInputError, UnauthorizedError

SCHEME = "arachne-jetson"
DEFAULT_DEVICE = "localhost:5051"
DEFAULT_PORT = 5051
DEFAULT_TIMEOUT = 10.0  # seconds to wait for an answer to a control call or a prediction
DEFAULT_CONNECT_TIMEOUT = 3.0  # seconds to open a connection: a device that is off costs no more
DEFAULT_UPLOAD_TIMEOUT = 600.0  # an upload's answer comes after the device has loaded the model
PROBE_TIMEOUT = 3.0  # seconds to wait for a status answer, or for a model's metadata before predicting
MAX_DEFAULT_PARALLEL = 256  # devices worked on at once unless -C parallel says otherwise
CONNECTION_KEYS = ("token", "tls", "ca_cert", "timeout", "connect_timeout", "upload_timeout")
FLEET_KEYS = ("fleet", "parallel", "min_success", "converge", "progress", "report", "retarget", "forget")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
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


@dataclass(frozen=True)
class Connection:
    """How to talk to the devices of a target: token, TLS, CA bundle, timeouts."""

    token: str | None = None
    tls: bool = False
    ca_cert: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT
    token_given: bool = False  # the token came from -C token (not $ARACHNE_TOKEN): it stands in for any device's

    def probing(self) -> Connection:
        """The same with a short wait for answers: for questions that must not hang on one device."""
        return replace(self, timeout=min(self.timeout, PROBE_TIMEOUT))

    def for_device(self, device: Device) -> Connection:
        """The fleet file's settings for `device` win; what it leaves unset comes from here.

        A device whose `token_env` variable is unset is refused here, before any request, unless
        `-C token` gave a token: otherwise the device's 401 would be all the user sees."""
        token = os.environ.get(device.token_env) if device.token_env else None
        if device.token_env and not token and not self.token_given:
            raise UnauthorizedError(
                f"device {device}: its token_env variable {device.token_env} (fleet file) is not set; "
                f"export {device.token_env}=<token> or pass -C token=...; nothing was sent to {device.address}"
            )
        return replace(
            self,
            token=token or self.token,
            tls=self.tls if device.tls is None else device.tls,
            ca_cert=device.ca_cert or self.ca_cert,
        )

    def client(self, device: Device):
        """A `DeviceClient` for `device` (a context manager)."""
        from arachne_mlflow.client import DeviceClient

        conn = self.for_device(device)
        return DeviceClient(
            device.host,
            device.port,
            token=conn.token,
            tls=conn.tls,
            ca_cert=conn.ca_cert,
            timeout=conn.timeout,
            connect_timeout=conn.connect_timeout,
            upload_timeout=conn.upload_timeout,
        )


@dataclass(frozen=True)
class Settings:
    """Everything `-C key=value` (or the environment) sets for one command."""

    connection: Connection = field(default_factory=Connection)
    fleet: str | None = None  # the fleet file named by -C fleet (else $ARACHNE_FLEET, else the default)
    parallel: int | None = None  # None: sized to the fleet
    min_success: str | None = None  # "N" or "P%"; None: every device
    converge: bool = False  # create acts like update when the deployment exists
    progress: bool | None = None  # None: a bar on a terminal for large models
    report: bool = True  # the per-device table on stderr
    retarget: bool = False  # create/update: the command's target becomes the deployment's recorded target
    forget: bool = False  # delete: devices that cannot be reached are forgotten by the registry all the same
    strategy: Strategy = field(default_factory=Strategy)  # batches, canary, health gate (strategy.py)

    def workers(self, devices: int) -> int:
        return max(1, self.parallel or min(devices, MAX_DEFAULT_PARALLEL))

    def required(self, devices: int) -> int:
        """How many of `devices` must reach the desired state for the command to succeed."""
        if self.min_success is None:
            return devices
        text = self.min_success.strip()
        if text.endswith("%"):
            return min(devices, math.ceil(float(text[:-1]) / 100 * devices))
        return min(devices, int(text))


def target_parts(target_uri: str) -> list[str]:
    """The comma-separated parts of a target URI (`host:port`, device names, `@group`), in order."""
    if target_uri != SCHEME and not target_uri.startswith(SCHEME + ":"):
        raise InvalidInputError(f"target {target_uri!r} is not an {SCHEME} target")
    rest = target_uri[len(SCHEME) :].lstrip(":").lstrip("/")
    if not rest:
        rest = os.environ.get("ARACHNE_DEVICE") or DEFAULT_DEVICE
    parts = [part.strip().rstrip("/") for part in rest.split(",")]
    if not all(parts):
        raise InvalidInputError(f"target {target_uri!r} has an empty device; use {SCHEME}://host:port[,host:port...]")
    return parts


def target_of(target_uri: str) -> str:
    """The part of a target URI that names devices (what the registry records as `target`)."""
    return ",".join(target_parts(target_uri))


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


def settings(config: Mapping[str, Any] | None) -> Settings:
    """The settings of one command from `config` (`-C key=value`, strings) and the environment.

    A key that is not a setting is refused: a typo must not silently mean "no token".
    """
    config = dict(config or {})
    known = {*CONNECTION_KEYS, *FLEET_KEYS, *ROLLOUT_KEYS}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidInputError(f"unknown config {unknown}; known: {sorted(known)}")
    env = os.environ.get
    connection = Connection(
        token=config.get("token") or env("ARACHNE_TOKEN") or None,
        tls=flag("tls", config.get("tls", env("ARACHNE_TLS")), False),
        ca_cert=config.get("ca_cert") or env("ARACHNE_CA_CERT") or None,
        timeout=_seconds(config, "timeout", env("ARACHNE_TIMEOUT"), DEFAULT_TIMEOUT),
        connect_timeout=_seconds(config, "connect_timeout", env("ARACHNE_CONNECT_TIMEOUT"), DEFAULT_CONNECT_TIMEOUT),
        upload_timeout=_seconds(config, "upload_timeout", None, DEFAULT_UPLOAD_TIMEOUT),
        token_given=bool(config.get("token")),
    )
    parallel = config.get("parallel")
    if parallel is not None:
        if not str(parallel).isdigit() or int(parallel) < 1:
            raise InvalidInputError(f"config parallel must be a number of devices >= 1, got {parallel!r}")
        parallel = int(parallel)
    min_success = config.get("min_success")
    if min_success is not None and not re.fullmatch(r"\d+|\d+(\.\d+)?%", str(min_success).strip()):
        raise InvalidInputError(f"config min_success must be a count (3) or a percentage (90%), got {min_success!r}")
    if min_success is not None and str(min_success).strip().endswith("%") and float(str(min_success)[:-1]) > 100:
        raise InvalidInputError(f"config min_success cannot exceed 100%, got {min_success!r}")
    progress = config.get("progress")
    return Settings(
        connection=connection,
        fleet=config.get("fleet") or None,
        parallel=parallel,
        min_success=None if min_success is None else str(min_success),
        converge=flag("converge", config.get("converge"), False),
        progress=None if progress is None else flag("progress", progress, False),
        report=flag("report", config.get("report"), True),
        retarget=flag("retarget", config.get("retarget"), False),
        forget=flag("forget", config.get("forget"), False),
        strategy=strategy_of(config),
    )


def _seconds(config: Mapping[str, Any], key: str, env_value: str | None, default: float) -> float:
    value = config.get(key, env_value)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError as err:
        raise InvalidInputError(f"config {key} must be a number of seconds, got {value!r}") from err
    if not seconds > 0:
        raise InvalidInputError(f"config {key} must be more than 0 seconds, got {value!r}")
    return seconds
