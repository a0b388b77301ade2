"""Devices and settings of the `arachne-jetson` deployments target: what a target names, how to reach it.

arachne-jetson                               ARACHNE_DEVICE, default localhost:5051
arachne-jetson://jetson-1:5051               one device
arachne-jetson:/jetson-1:5051                the form `mlflow deployments` also accepts
arachne-jetson://jetson-1:5051,jetson-2      several devices (the port defaults to 5051)
arachne-jetson://cam-1,@lyon,@all            devices and groups of the fleet file (fleet/inventory.py)
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arachne_mlflow.deployments.capture import capture_setting
from arachne_mlflow.deployments.strategy import ROLLOUT_KEYS, Strategy, strategy_of
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.fleet.connection import CONNECTION_KEYS, Connection, connection_of, flag
from arachne_mlflow.fleet.device import SCHEME, Device, parse_address
from arachne_mlflow.fleet.inventory import Inventory, find_inventory, fleet_path

DEFAULT_DEVICE = "localhost:5051"
MAX_DEFAULT_PARALLEL = 256  # devices worked on at once unless -C parallel says otherwise
FLEET_KEYS = (
    "fleet",
    "parallel",
    "min_success",
    "converge",
    "progress",
    "report",
    "retarget",
    "forget",
    "variants",
    "trust_keys",
    "capture",
)
MAX_ORDER = 16  # names in -C variants (a model holds at most as many variants: model/directory.py)


class UnknownTargetError(InvalidInputError):
    """A target names something the fleet file does not know: reported, never contacted."""


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
    variants: tuple[str, ...] | None = None  # -C variants=a,b: the deployment's order of a model's variants
    trust_keys: tuple[str, ...] = ()  # -C trust_keys=a.pub,keys/: verify before pushing (over the fleet file's)
    capture: dict[str, Any] | None = None  # -C capture=...: field-capture rules set after install ({}: off)

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


def config_pairs(pairs: list[str]) -> dict[str, str]:
    """The CLI's `-C key=value` flags as the config dict MLflow's own CLI would give the plugin."""
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"-C takes key=value, got {pair!r}")
        config[key.strip()] = value
    return config


def settings(config: Mapping[str, Any] | None) -> Settings:
    """The settings of one command from `config` (`-C key=value`, strings) and the environment.

    A key that is not a setting is refused: a typo must not silently mean "no token".
    """
    config = dict(config or {})
    known = {*CONNECTION_KEYS, *FLEET_KEYS, *ROLLOUT_KEYS}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidInputError(f"unknown config {unknown}; known: {sorted(known)}")
    connection = connection_of(config)
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
        variants=variant_order(config.get("variants")),
        trust_keys=tuple(p.strip() for p in str(config.get("trust_keys") or "").split(",") if p.strip()),
        capture=capture_setting(config.get("capture")),
    )


def variant_order(value: Any) -> tuple[str, ...] | None:
    """`-C variants=tvm-jetson,onnx`: the variants a device may get, in order of preference (None: the model's)."""
    if value is None:
        return None
    names = tuple(dict.fromkeys(part.strip() for part in str(value).split(",")))
    if not all(names) or len(names) > MAX_ORDER:
        raise InvalidInputError(f"config variants must be 1 to {MAX_ORDER} names, comma-separated; got {value!r}")
    return names


def trusted_keys(settings: Settings) -> list | None:
    """The keys a push verifies models against: `-C trust_keys`, else the fleet file's `trust_keys`;
    None when neither names any (nothing is verified on the host)."""
    paths = settings.trust_keys
    if not paths:
        inventory = find_inventory(settings.fleet)
        paths = inventory.trust_keys if inventory else ()
    if not paths:
        return None
    from arachne_mlflow.model.signing import load_trusted_keys

    return load_trusted_keys(paths)


def resolve_target(target_uri: str, fleet: str | None = None, *, recorded: bool = False) -> list[Device]:
    """The devices a target URI names, in order, without duplicates.

    `@group` and device names come from the fleet file; with a fleet file, a name without a port
    that is not one of its devices is an error naming the file (never a DNS lookup). `host:port`
    is the fleet file's device of that address when there is one (with its settings), else, for a
    target given on the command line, that address. A `recorded` target (read from the registry,
    which others may write) names only the fleet file's devices and groups: anything else is
    refused before any device is contacted.
    """
    parts = target_parts(target_uri)
    inventory = find_inventory(fleet)
    if recorded and inventory is None:
        path, _ = fleet_path(fleet)
        raise UnknownTargetError(
            f"the registry's target {target_of(target_uri)!r} is not contacted: there is no fleet file {path} "
            "(a target recorded in the registry may only name the fleet file's devices and groups)"
        )
    devices: list[Device] = []
    for part in parts:
        found = _resolve_part(part, target_uri, inventory, fleet, recorded)
        devices += [d for d in found if d not in devices]
    return devices


def _resolve_part(
    part: str, target_uri: str, inventory: Inventory | None, fleet: str | None, recorded: bool
) -> list[Device]:
    if part.startswith("@"):
        if inventory is None:
            path, _ = fleet_path(fleet)
            raise InvalidInputError(f"target {target_uri!r} names group {part} but there is no fleet file {path}")
        found = inventory.group(part[1:])
        if not found:
            raise InvalidInputError(f"group {part} of fleet file {inventory.path} has no devices")
        return found
    if inventory is not None and part in inventory.devices:
        return [inventory.devices[part]]
    device = parse_address(part, f"target {target_uri!r}")
    known = inventory and next((d for d in inventory.devices.values() if d.address == device.address), None)
    if known:
        return [known]
    if recorded:
        raise UnknownTargetError(
            f"the registry's target names {part!r}, which is no device of fleet file {inventory.path}: "
            "not contacted (a target recorded in the registry may only name the fleet file's devices and groups; "
            "add the device to the fleet file, or delete the deployment)"
        )
    if inventory is not None and ":" not in part and not _is_ip(device.host):
        raise UnknownTargetError(
            f"no device {part!r} in fleet file {inventory.path} (devices: {', '.join(sorted(inventory.devices))}); "
            f"a device outside the file is host:port"
        )
    return [device]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
