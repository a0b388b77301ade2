"""Where the remote runtime connects: `rpc_info`'s keys, a fleet device's name, the environment.

    rpc_info={"host": "jetson-1", "port": 5051}     an address (the earlier Arachne Runtime's form)
    rpc_info={"device": "cam-1"}                     a device of the fleet file, by name
    rpc_info={"host": "cam-1"}                       no port: the fleet file's device of that name,
                                                     else that host on port 5051

The token, TLS and CA bundle come from `rpc_info`, else (for a fleet device) the fleet file's
settings for it, else `$ARACHNE_TOKEN`, `$ARACHNE_TLS`, `$ARACHNE_CA_CERT`: what the deployments
plugin sends to the same device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.fleet.connection import connection_of
from arachne_mlflow.fleet.device import DEFAULT_PORT
from arachne_mlflow.fleet.inventory import find_inventory, fleet_path

KEYS = {
    "host",
    "port",
    "device",
    "token",
    "tls",
    "ca_cert",
    "verify",
    "timeout",
    "connect_timeout",
    "trust_env",
    "shared_memory",  # inputs through system shared memory to a server on loopback (DeviceClient)
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def client_options(rpc_info: Mapping[str, Any]) -> dict[str, Any]:
    """The `DeviceClient` keyword arguments `rpc_info` amounts to."""
    if not isinstance(rpc_info, Mapping) or not {"host", "device"} & set(rpc_info):
        raise InvalidInputError(
            f"rpc_info must be a dict with 'host' and 'port', or the 'device' name of a fleet file, got {rpc_info!r}"
        )
    unknown = set(rpc_info) - KEYS
    if unknown:
        raise InvalidInputError(f"unknown rpc_info keys {sorted(unknown)}; known: {sorted(KEYS)}")
    options = dict(rpc_info)
    name = options.pop("device", None)
    if name is not None and ("host" in options or "port" in options):
        raise InvalidInputError("rpc_info names a fleet 'device' and a 'host'/'port': give one or the other")
    if name is not None or "port" not in options:
        found = _fleet_device(name or options["host"], required=name is not None)
        if found:
            options.pop("host", None)
            options = {**found, **options}
    options.setdefault("port", DEFAULT_PORT)
    env = os.environ.get
    if options.get("token") is None and env("ARACHNE_TOKEN"):
        options["token"] = env("ARACHNE_TOKEN")
    if "tls" not in options and env("ARACHNE_TLS"):
        options["tls"] = _env_flag("ARACHNE_TLS")
    if options.get("ca_cert") is None and env("ARACHNE_CA_CERT"):
        options["ca_cert"] = env("ARACHNE_CA_CERT")
    return options


def _fleet_device(name: str, required: bool) -> dict[str, Any]:
    """Address, token, TLS and CA bundle of fleet device `name` ({} when not in the fleet file and not
    `required`), read as the deployments plugin reads it."""
    inventory = find_inventory()
    device = inventory.devices.get(name) if inventory is not None else None
    if device is None:
        if not required:
            return {}
        if inventory is None:
            raise InvalidInputError(
                f"rpc_info names fleet device {name!r}, but there is no fleet file {fleet_path()[0]} "
                "(set ARACHNE_FLEET, or give rpc_info 'host' and 'port')"
            )
        raise InvalidInputError(
            f"no device {name!r} in fleet file {inventory.path}; its devices: {sorted(inventory.devices)}"
        )
    connection = connection_of({}).for_device(device)
    found = {"host": device.host, "port": device.port, "name": name, "token": connection.token, "tls": connection.tls}
    if connection.ca_cert:
        found["ca_cert"] = connection.ca_cert
    return found


def _env_flag(name: str) -> bool:
    text = os.environ[name].strip().lower()
    if text not in _TRUE | _FALSE:
        raise InvalidInputError(f"${name} must be true or false, got {os.environ[name]!r}")
    return text in _TRUE
