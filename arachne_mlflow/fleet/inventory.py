"""The fleet file: devices by name (address, labels, how to reach them) and groups of them.

    defaults: {port: 5051, token_env: ARACHNE_TOKEN, tls: false}
    devices:
      cam-1: {address: "10.0.0.5:5051", labels: {site: lyon, arch: aarch64}}
      cam-2: {address: cam-2.local, labels: {site: lyon}, token_env: CAM2_TOKEN}
      cam-3: "10.0.0.7"                      # just an address
    groups:
      lyon: {labels: {site: lyon}}           # a label selector
      canary: [cam-1]                        # or device names
    trust_keys: [keys/release.pub]           # verify models against these before pushing (optional)

Its path is `-C fleet=PATH`, else `$ARACHNE_FLEET`, else `~/.arachne-mlflow/fleet.yaml` (used
when it exists). Tokens never go in the file: `token_env` names the variable that holds one.
Errors name the file, the line and the key, from PyYAML's marks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.fleet.connection import flag
from arachne_mlflow.fleet.device import DEFAULT_PORT, Device, split_address

DEFAULT_PATH = Path("~/.arachne-mlflow/fleet.yaml")
ALL = "all"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_KEYS = ("defaults", "devices", "groups", "trust_keys")
_DEFAULT_KEYS = ("port", "token_env", "tls", "ca_cert")
_DEVICE_KEYS = ("address", "labels", *_DEFAULT_KEYS)


class FleetFileError(InvalidInputError):
    """The fleet file is missing or wrong; the message names the file, line and key."""


@dataclass(frozen=True)
class Inventory:
    """The devices of a fleet file by name, and its groups as lists of device names (file order)."""

    path: Path
    devices: dict[str, Device]
    groups: dict[str, list[str]]
    trust_keys: tuple[str, ...] = ()  # public keys (files or directories) a push verifies models against

    def group(self, name: str) -> list[Device]:
        if name == ALL:
            return list(self.devices.values())
        if name not in self.groups:
            raise InvalidInputError(f"no group @{name} in fleet file {self.path} (groups: {sorted(self.groups)})")
        return [self.devices[d] for d in self.groups[name]]


def fleet_path(explicit: str | None = None) -> tuple[Path, bool]:
    """The fleet file's path, and whether it was asked for (then it must exist)."""
    if explicit:
        return Path(explicit).expanduser(), True
    if os.environ.get("ARACHNE_FLEET"):
        return Path(os.environ["ARACHNE_FLEET"]).expanduser(), True
    return DEFAULT_PATH.expanduser(), False


def find_inventory(explicit: str | None = None) -> Inventory | None:
    """The fleet file named by `explicit`, `$ARACHNE_FLEET` or the default path; None when there is none."""
    path, required = fleet_path(explicit)
    if not path.is_file():
        if required:
            raise FleetFileError(f"fleet file {path} does not exist")
        return None
    return load_inventory(path)


def load_inventory(path: str | os.PathLike) -> Inventory:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FleetFileError(f"cannot read fleet file {path}: {err}") from err
    return _Reader(path, text).inventory()


class _Reader:
    """Walks the YAML nodes (not the constructed data) so that every error has its line."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.loader = yaml.SafeLoader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line = f":{mark.line + 1}" if mark else ""
            raise FleetFileError(f"{path}{line}: not valid YAML: {err.problem or err}") from err
        except yaml.YAMLError as err:
            raise FleetFileError(f"{path}: not valid YAML: {err}") from err

    def inventory(self) -> Inventory:
        sections = dict.fromkeys(_TOP_KEYS)
        if self.root is not None:
            for key, key_node, value in self.mapping(self.root, "fleet file"):
                if key not in sections:
                    raise self.error(key_node, key, f"unknown key; a fleet file has {', '.join(_TOP_KEYS)}")
                sections[key] = value
        defaults = self.defaults(sections["defaults"])
        devices: dict[str, Device] = {}
        for name, key_node, value in self.mapping(sections["devices"], "devices"):
            if not _NAME.match(name):
                raise self.error(key_node, f"devices.{name}", "a device name is letters, digits, '.', '_', '-'")
            device = self.device(name, value, defaults)
            twin = next((d for d in devices.values() if (d.host, d.port) == (device.host, device.port)), None)
            if twin is not None:
                raise self.error(key_node, f"devices.{name}", f"has the address of {twin.name} ({device.address})")
            devices[name] = device
        groups: dict[str, list[str]] = {}
        for name, key_node, value in self.mapping(sections["groups"], "groups"):
            if not _NAME.match(name) or name == ALL:
                reason = "is every device already (@all)" if name == ALL else "letters, digits, '.', '_', '-'"
                raise self.error(key_node, f"groups.{name}", reason)
            groups[name] = self.group(name, value, devices)
        return Inventory(self.path, devices, groups, self.trust_keys(sections["trust_keys"]))

    def trust_keys(self, node: yaml.Node | None) -> tuple[str, ...]:
        """`trust_keys`: a path or a list of paths (relative to the fleet file) of public keys or key directories."""
        if node is None:
            return ()
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        paths = []
        for item in items:
            value = self.scalar(item, "trust_keys")
            if not isinstance(value, str) or not value:
                raise self.error(item, "trust_keys", f"must be the path of a public key or a directory, got {value!r}")
            paths.append(str((self.path.parent / Path(value).expanduser()).resolve()))
        return tuple(paths)

    def defaults(self, node: yaml.Node | None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, key_node, value in self.mapping(node, "defaults"):
            if key not in _DEFAULT_KEYS:
                raise self.error(key_node, f"defaults.{key}", f"unknown key; defaults take {', '.join(_DEFAULT_KEYS)}")
            values[key] = self.setting(key, value, f"defaults.{key}")
        return values

    def device(self, name: str, node: yaml.Node, defaults: dict[str, Any]) -> Device:
        where = f"devices.{name}"
        if isinstance(node, yaml.ScalarNode):
            entries: dict[str, tuple[yaml.Node, yaml.Node]] = {"address": (node, node)}
        else:
            entries = {key: (key_node, value) for key, key_node, value in self.mapping(node, where)}
        for key, (key_node, _) in entries.items():
            if key not in _DEVICE_KEYS:
                raise self.error(key_node, f"{where}.{key}", f"unknown key; a device takes {', '.join(_DEVICE_KEYS)}")
        if "address" not in entries:
            raise self.error(node, where, "needs an address (host or host:port)")
        address_node = entries["address"][1]
        address = self.scalar(address_node, f"{where}.address")
        try:
            host, port = split_address(str(address), f"{where}.address")
        except InvalidInputError as err:
            message = f"{address!r} is not host, host:port or [v6]:port"
            raise self.error(address_node, f"{where}.address", message) from err
        values = dict(defaults)
        for key in _DEFAULT_KEYS:
            if key in entries:
                values[key] = self.setting(key, entries[key][1], f"{where}.{key}")
        if port is not None and "port" in entries:
            raise self.error(entries["port"][0], f"{where}.port", "the address has a port already")
        labels = {}
        if "labels" in entries:
            labels = self.labels(entries["labels"][1], f"{where}.labels")
        return Device(
            host,
            port or values.get("port", DEFAULT_PORT),
            name=name,
            token_env=values.get("token_env"),
            tls=values.get("tls"),
            ca_cert=values.get("ca_cert"),
            labels=labels,
        )

    def group(self, name: str, node: yaml.Node, devices: dict[str, Device]) -> list[str]:
        where = f"groups.{name}"
        if isinstance(node, yaml.SequenceNode):
            members = []
            for item in node.value:
                member = str(self.scalar(item, where))
                if member not in devices:
                    raise self.error(item, where, f"no device {member!r} in devices")
                if member not in members:
                    members.append(member)
            return members
        entries = {key: (key_node, value) for key, key_node, value in self.mapping(node, where)}
        for key, (key_node, _) in entries.items():
            if key != "labels":
                message = "unknown key; a group is a list of devices or {labels: ...}"
                raise self.error(key_node, f"{where}.{key}", message)
        if "labels" not in entries:
            raise self.error(node, where, "a group is a list of device names or {labels: {key: value}}")
        selector = self.labels(entries["labels"][1], f"{where}.labels")
        if not selector:
            raise self.error(entries["labels"][1], f"{where}.labels", "needs at least one label (@all is every device)")
        return [d for d, device in devices.items() if all(device.labels.get(k) == v for k, v in selector.items())]

    def labels(self, node: yaml.Node, where: str) -> dict[str, str]:
        return {key: _label(self.scalar(value, f"{where}.{key}")) for key, _, value in self.mapping(node, where)}

    def setting(self, key: str, node: yaml.Node, where: str) -> Any:
        value = self.scalar(node, where)
        if key == "port":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise self.error(node, where, f"must be a port number (1-65535), got {value!r}")
            return value
        if key == "token_env":
            if not isinstance(value, str) or not _ENV_NAME.match(value):
                message = f"must name an environment variable (never the token itself), got {value!r}"
                raise self.error(node, where, message)
            return value
        if key == "tls":
            try:
                return flag(where, value, False)
            except InvalidInputError as err:
                raise self.error(node, where, f"must be true or false, got {value!r}") from err
        if not isinstance(value, str) or not value:
            raise self.error(node, where, f"must be the path of a CA bundle (PEM), got {value!r}")
        return str((self.path.parent / Path(value).expanduser()).resolve())  # relative to the fleet file

    def mapping(self, node: yaml.Node | None, where: str) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, where, "must be a mapping (key: value)")
        seen = set()
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, where, "keys must be plain names")
            key = key_node.value
            if key in seen:
                raise self.error(key_node, f"{where}.{key}", "is given twice")
            seen.add(key)
            yield key, key_node, value

    def scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, where, "must be a single value")
        return self.loader.construct_object(node)

    def error(self, node: yaml.Node, key: str, message: str) -> FleetFileError:
        return FleetFileError(f"{self.path}:{node.start_mark.line + 1}: {key}: {message}")


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
