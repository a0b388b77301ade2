"""`arachne-mlflow fleet status`: for every deployment, what the registry wants against what each device runs.

The registry says what should run (the model URI resolved now: an alias may have moved since the
last rollout); each device is asked what it runs (its model store is the truth), all at once and
with short timeouts; for a device that cannot be asked, the version tags give the last known state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments import report
from arachne_mlflow.deployments.converge import on_devices, read_device
from arachne_mlflow.deployments.desired_state import DELETING, HALTED, ROLLED_OUT, Desired, DesiredState
from arachne_mlflow.deployments.results import UNKNOWN, version_label
from arachne_mlflow.deployments.source import registry_version
from arachne_mlflow.deployments.staged_view import StagedRollout, staged_rollout
from arachne_mlflow.deployments.targets import SCHEME, Settings, resolve_target
from arachne_mlflow.errors import ArachneError, DeviceUnreachableError
from arachne_mlflow.fleet.device import Device

EXIT_OK, EXIT_DRIFT, EXIT_USAGE, EXIT_UNCHECKED = 0, 1, 2, 3
_UNCHECKED = ("unreachable", "error")


@dataclass
class DeviceStatus:
    device: str
    address: str
    desired: str  # version label of what should run ("-": nothing, while deleting)
    actual: str  # what runs ("-": nothing, "?": could not ask)
    state: str  # READY, UNAVAILABLE, absent, unreachable, error
    in_sync: bool
    revision: int | None = None
    last_known: str | None = None  # from the version tags, for a device that could not be asked
    error: str | None = None
    variant: str | None = None  # of a model with variants: the one the device runs
    signer: str | None = None  # the key fingerprint that signed the version it runs (None: unsigned)
    requires_signature: bool | None = None  # serve --trust-key (None: not known, the device was not asked)


@dataclass
class DeploymentStatus:
    deployment: str
    registered_model: str
    model_uri: str
    target: str
    status: str
    reason: str
    desired_version: str | None  # what the model URI names now
    rolled_out_version: str | None  # what the last rollout pushed
    devices: list[DeviceStatus] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    error: str | None = None
    usage: bool = False  # the error is the command's: a name the registry does not know
    staged: StagedRollout | None = None  # a staged pull rollout of its alias under way (staged_view.py)

    @property
    def in_sync(self) -> bool:
        return not self.drift and self.error is None


def status(names: Sequence[str], settings: Settings, state: DesiredState) -> list[DeploymentStatus]:
    """The status of every deployment the registry records (or of those in `names`)."""
    every, broken = state.scan()
    recorded = [d for d in every if not names or d.deployment in names]
    statuses, pairs = [], []
    for desired in recorded:
        found, devices = _deployment(desired, settings, state)
        statuses.append(found)
        tags = state.recorded(desired) if found.error is None else {}
        pairs += [(found, tags.get(str(device), {}), device) for device in devices]
    connection = settings.connection.probing()
    answers = on_devices(
        pairs, lambda pair: read_device(pair[2], connection, pair[0].deployment), settings.workers(len(pairs))
    )
    for (found, tags, device), answer in zip(pairs, answers):
        found.devices.append(_device_status(found, device, answer, tags))
    for found in statuses:
        found.drift += _drift(found)
    for bad in broken:
        if not names or bad.deployment in names:
            statuses.append(
                DeploymentStatus(bad.deployment, bad.registered_model, "", "", "", "", None, None, error=bad.error)
            )
    known = {s.deployment for s in statuses}
    for missing in sorted(set(names) - known):
        listed = ", ".join(sorted({d.deployment for d in every})) or "none"
        error = f"no such deployment in the registry (deployments: {listed})"
        statuses.append(DeploymentStatus(missing, "", "", "", "", "", None, None, error=error, usage=True))
    return statuses


def exit_code(statuses: Sequence[DeploymentStatus]) -> int:
    """0 every device of every deployment runs its desired version; 2 a name the registry does not
    know; 3 something could not be checked (a device unreachable or refusing, a record or a target
    the fleet file cannot read); 1 drift (a device without the desired version, an alias moved,
    a rollout rolling, halted or deleting)."""
    if any(s.usage for s in statuses):
        return EXIT_USAGE
    unchecked = any(s.error for s in statuses) or any(d.state in _UNCHECKED for s in statuses for d in s.devices)
    if unchecked:
        return EXIT_UNCHECKED
    return EXIT_OK if all(s.in_sync for s in statuses) else EXIT_DRIFT


def _deployment(desired: Desired, settings: Settings, state: DesiredState) -> tuple[DeploymentStatus, list[Device]]:
    found = DeploymentStatus(
        desired.deployment,
        desired.registered_model,
        desired.model_uri,
        desired.target,
        desired.status,
        desired.reason,
        None,
        desired.version,
    )
    try:
        if desired.status != DELETING:
            now = registry_version(desired.model_uri, state.client)
            found.desired_version = now.version if now else None
        devices = resolve_target(f"{SCHEME}://{desired.target}", settings.fleet, recorded=True)
        if desired.status != DELETING:
            _with_staged(found, staged_rollout(desired.model_uri, state.client, devices))
        return found, devices
    except (ArachneError, MlflowException) as err:  # an alias deleted, a group gone: said, and the others go on
        found.error = str(err)
        return found, []


def _with_staged(found: DeploymentStatus, staged: StagedRollout | None) -> None:
    """The deployment as a staged pull rollout holds it: the tag's state (rolling, halted) and what it says."""
    if staged is not None:
        found.staged, found.status, found.reason = staged, staged.state, staged.describe()


def _wanted_version(found: DeploymentStatus, device: Device) -> str | None:
    """The version `device` should run: the one its model URI names now, or the staged rollout's for it
    (None: whatever version of the model it has)."""
    return found.staged.wanted(str(device)) if found.staged else found.desired_version


def _device_status(found: DeploymentStatus, device: Device, answer: Any, recorded: dict[str, dict]) -> DeviceStatus:
    version = _wanted_version(found, device)
    wanted = "-" if found.status == DELETING else (f"v{version}" if version else "kept")
    if isinstance(answer, ArachneError):
        versions = sorted(recorded.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0)
        known = "; ".join(f"v{v} {e.get('state')}" for v, e in versions)
        kind = "unreachable" if isinstance(answer, DeviceUnreachableError) else "error"
        return DeviceStatus(str(device), device.address, wanted, UNKNOWN, kind, False, None, known or None, str(answer))
    actual = version_label(answer, found.registered_model)
    if answer is None:
        return DeviceStatus(str(device), device.address, wanted, actual, "absent", found.status == DELETING)
    provenance = answer.get("provenance") or {}
    same = (
        found.status != DELETING
        and provenance.get("registered_model") == found.registered_model
        and (version is None or str(provenance.get("version")) == str(version))
        and answer.get("state") == "READY"
    )
    state = answer.get("state", UNKNOWN)
    revision, variant = answer.get("revision"), answer.get("variant")
    result = DeviceStatus(str(device), device.address, wanted, actual, state, same, revision, variant=variant)
    return _with_signature(result, answer)


def _with_signature(result: DeviceStatus, record: dict[str, Any]) -> DeviceStatus:
    """Who signed the version the device runs, and whether it requires signed models."""
    signature = record.get("signature")
    result.signer = signature.get("signer") if isinstance(signature, dict) else None
    result.requires_signature = bool(record.get("signatures_required"))
    return result


def _signature_cell(device: DeviceStatus) -> str:
    """`key <fingerprint> (required)`; a device that does not require signatures does not check them."""
    if device.requires_signature is None:
        return "?"
    if not device.requires_signature:
        return "not checked"
    return f"key {device.signer[:16]} (required)" if device.signer else "unsigned (required)"


def _drift(found: DeploymentStatus) -> list[str]:
    if found.error:
        return [found.error]
    drift = []
    changed = found.desired_version is not None and found.desired_version != found.rolled_out_version
    if changed and found.staged is None:  # (a staged rollout's reason says where the alias is)
        alias = found.model_uri.rsplit("@", 1)[1] if "@" in found.model_uri else None
        moved = (
            f"alias {alias} moved to v{found.desired_version}"
            if alias
            else f"{found.model_uri} is now v{found.desired_version}"
        )
        done = "halted" if found.status == HALTED else "was rolled out"
        drift.append(f"{moved} (v{found.rolled_out_version} {done})")
    if found.status != ROLLED_OUT:
        drift.append(f"status {found.status}" + (f": {found.reason}" if found.reason else ""))
    for device in found.devices:
        if device.in_sync:
            continue
        if device.state in ("unreachable", "error"):
            known = f" (last known: {device.last_known})" if device.last_known else ""
            drift.append(f"device {device.device} is {device.state}{known}")
        elif device.actual == "-":
            drift.append(f"device {device.device} lacks it")
        elif found.status == DELETING:
            drift.append(f"device {device.device} still has {device.actual}")
        elif device.state != "READY":
            drift.append(f"device {device.device} has {device.actual} {device.state}")
        else:
            drift.append(f"device {device.device} runs {device.actual}")
    return drift


def _variant_column(headers: list[str], rows: list[list[Any]], variants: list[str | None]) -> None:
    """A `variant` column after `actual`, when a device runs a model with variants."""
    if any(variants):
        headers.insert(3, "variant")
        for row, variant in zip(rows, variants):
            row.insert(3, variant or "")


def to_json(statuses: Sequence[DeploymentStatus]) -> str:
    return json.dumps([{**asdict(s), "in_sync": s.in_sync} for s in statuses], indent=2)


def to_text(statuses: Sequence[DeploymentStatus]) -> str:
    if not statuses:
        return "no deployments recorded in the registry\n"
    parts = []
    for s in statuses:
        if not s.target:  # (no desired state: a name the registry does not know, or a tag that is not one)
            parts.append(f"{s.deployment}: {s.error}\n")
            continue
        wanted = f" -> v{s.desired_version}" if s.desired_version else ""
        text = f"{s.deployment}: {s.model_uri}{wanted} on {s.target or '?'} ({s.status or 'unknown'})\n"
        if s.devices:
            headers = ["device", "desired", "actual", "state", "in sync"]
            rows = [[d.device, d.desired, d.actual, d.state, "yes" if d.in_sync else "no"] for d in s.devices]
            _variant_column(headers, rows, [d.variant for d in s.devices])
            if any(d.signer or d.requires_signature for d in s.devices):
                headers.append("signed by")
                for row, d in zip(rows, s.devices):
                    row.append(_signature_cell(d))
            if any(d.error for d in s.devices):
                headers.append("error")
                for row, d in zip(rows, s.devices):
                    row.append(d.error or "")
            text += report.table(headers, rows)
        text += ("drift: " + "; ".join(s.drift) if s.drift else "in sync") + "\n"
        parts.append(text)
    return "\n".join(parts)
