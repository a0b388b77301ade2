"""How to reach a fleet's devices: token, TLS, CA bundle and timeouts, from `-C key=value` and the environment.

The fleet file's settings for a device win over these (`Connection.for_device`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from arachne_mlflow.errors import InvalidInputError, UnauthorizedError
from arachne_mlflow.fleet.device import Device

DEFAULT_TIMEOUT = 10.0  # seconds to wait for an answer to a control call or a prediction
DEFAULT_CONNECT_TIMEOUT = 3.0  # seconds to open a connection: a device that is off costs no more
DEFAULT_UPLOAD_TIMEOUT = 600.0  # an upload's answer comes after the device has loaded the model
PROBE_TIMEOUT = 3.0  # seconds to wait for a status answer, or for a model's metadata before predicting
CONNECTION_KEYS = ("token", "tls", "ca_cert", "timeout", "connect_timeout", "upload_timeout")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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


def connection_of(config: Mapping[str, Any]) -> Connection:
    """The connection settings in `config` (`-C key=value`, strings), else the environment's."""
    env = os.environ.get
    return Connection(
        token=config.get("token") or env("ARACHNE_TOKEN") or None,
        tls=flag("tls", config.get("tls", env("ARACHNE_TLS")), False),
        ca_cert=config.get("ca_cert") or env("ARACHNE_CA_CERT") or None,
        timeout=_seconds(config, "timeout", env("ARACHNE_TIMEOUT"), DEFAULT_TIMEOUT),
        connect_timeout=_seconds(config, "connect_timeout", env("ARACHNE_CONNECT_TIMEOUT"), DEFAULT_CONNECT_TIMEOUT),
        upload_timeout=_seconds(config, "upload_timeout", None, DEFAULT_UPLOAD_TIMEOUT),
        token_given=bool(config.get("token")),
    )


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
