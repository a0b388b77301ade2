"""`arachne-mlflow fleet rollback NAME`: every device of a deployment back to the version it ran before.

A device's store keeps the version its last upload replaced (`POST .../rollback` serves it again
from its own disk: no download, and the served version answers until the other has loaded). The
deployment's previous registered version (the registry's desired state records it) is the goal:
a device that kept it gets it back instantly, another one gets it pushed. Where the registry names
none, each device goes back to the version it kept. Then the desired state names what now runs,
pinned to its version, so that `fleet sync` keeps it there. (A halted rollout undoes itself with
the same device call: rollout.py.)
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments.converge import on_devices, push_device
from arachne_mlflow.deployments.desired_state import HALTED, ROLLED_OUT, ROLLING, Desired, DesiredState
from arachne_mlflow.deployments.operations import Outcome, counts
from arachne_mlflow.deployments.results import FAILED, ROLLED_BACK, UNCHANGED, DeviceResult, version_label
from arachne_mlflow.deployments.source import ModelSource, RegistryVersion, registry_version, resolve
from arachne_mlflow.deployments.targets import SCHEME, Settings, resolve_target, target_of
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device


def rollback(name: str, target: str | None, settings: Settings, state: DesiredState | None) -> Outcome:
    """Every device of deployment `name` (on `target`, else the registry's target) back to the
    deployment's previous registered version, or, where the registry names none, to the version
    each device kept; then the desired state records what runs."""
    desired = state.find(name) if state else None
    if target is None and desired is None:
        raise InvalidInputError(f"the registry records no deployment {name!r}: name its devices with --target")
    if target is not None:  # the user's own: addresses allowed
        devices = resolve_target(target if target.startswith(SCHEME) else f"{SCHEME}://{target}", settings.fleet)
    else:  # the registry's: the fleet file's devices and groups only
        devices = resolve_target(f"{SCHEME}://{desired.target}", settings.fleet, recorded=True)
    pinned = None
    if desired is not None and desired.previous_version:
        pinned = registry_version(f"models:/{desired.registered_model}/{desired.previous_version}", state.client)
    outcome = Outcome("rollback", name, required=settings.required(len(devices)), registry=pinned)
    with tempfile.TemporaryDirectory(prefix="arachne-rollback-") as tmp:
        source = _lazy_source(pinned, tmp, state)
        connection = settings.connection
        outcome.results = on_devices(
            devices, lambda d: rollback_device(d, connection, name, pinned, source), settings.workers(len(devices))
        )
    if desired is not None:
        whole = target is None or target_of(target if target.startswith(SCHEME) else f"{SCHEME}://{target}") == (
            desired.target
        )
        outcome.desired = _record(desired, pinned, outcome, state, whole)
    return outcome


def rollback_device(
    device: Device,
    connection: Connection,
    name: str,
    pinned: RegistryVersion | None,
    source: Callable[[], ModelSource],
) -> DeviceResult:
    """One device to `pinned` (instantly when it kept that version), or to the version it kept."""
    start = time.perf_counter()
    registered = pinned.registered_model if pinned else None
    before = "?"
    try:
        with connection.client(device) as client:
            record = client.model_record(name)
            before = version_label(record, registered)
            if record is not None and pinned is not None and _is(record, pinned):
                return _result(device, UNCHANGED, before, record, start)
            previous = (record or {}).get("previous")
            if previous is not None and (pinned is None or _is(previous, pinned)):
                return _result(device, ROLLED_BACK, before, client.rollback_model(name), start)
    except ArachneError as err:
        return DeviceResult(device, FAILED, before, before, time.perf_counter() - start, error=str(err))
    if pinned is None:
        what = "no deployment" if before == "-" else "no previous version"
        error = f"it keeps {what} of {name!r}, and the registry names no previous version to push"
        return DeviceResult(device, FAILED, before, before, time.perf_counter() - start, error=error)
    try:
        return push_device(device, connection, name, source())
    except (ArachneError, MlflowException) as err:  # the download of the previous version failed
        return DeviceResult(device, FAILED, before, before, time.perf_counter() - start, error=str(err))


def _record(
    desired: Desired, pinned: RegistryVersion | None, outcome: Outcome, state: DesiredState, whole: bool
) -> Desired:
    """The desired state after a rollback of the `whole` target: what the devices now run, pinned to
    its version; after one of part of it, those devices' entries only (the ledger: the deployment
    still wants what it wanted)."""
    if pinned is None:  # the devices' own previous versions: what most of them run now names it
        versions = [
            (r.provenance or {}).get("version")
            for r in outcome.results
            if r.ok and (r.provenance or {}).get("registered_model") == desired.registered_model
        ]
        if not versions:
            return desired
        version = str(max(set(versions), key=versions.count))
    else:
        version = pinned.version
    if not whole:
        try:
            state.record_devices(desired, version, outcome.results)
        except MlflowException as err:
            outcome.registry_error = str(err)
        return desired
    failed = [r for r in outcome.results if not r.ok]
    reason = f"fleet rollback from v{desired.version} to v{version}"
    if failed:
        reason += f"; {len(failed)} devices without v{version}"
    after = Desired(
        desired.deployment,
        desired.registered_model,
        desired.target,
        f"models:/{desired.registered_model}/{version}",
        status=ROLLING if failed else ROLLED_OUT,
        reason=reason,
        version=version,
        previous_version=None if desired.status == HALTED else desired.version,  # (a halted version never ran)
        devices=counts(outcome.results),
        strategy=desired.strategy,
    )
    try:
        state.save(after)
        state.record_devices(after, version, outcome.results)
    except MlflowException as err:  # (a user who may not write the registry: the devices keep what they got)
        outcome.registry_error = str(err)
    return after


def _lazy_source(pinned: RegistryVersion | None, tmp: str, state: DesiredState | None) -> Callable[[], ModelSource]:
    """The previous version's files, downloaded once, by the first device that needs a push."""
    lock, found = threading.Lock(), []

    def source() -> ModelSource:
        with lock:
            if not found:
                client = state.client if state else None
                found.append(resolve(pinned.pinned_uri, tmp, client=client, pinned=pinned))  # type: ignore[union-attr]
            return found[0]

    return source


def _is(record: dict[str, Any], pinned: RegistryVersion) -> bool:
    provenance = record.get("provenance") or {}
    return (provenance.get("registered_model"), str(provenance.get("version"))) == (
        pinned.registered_model,
        pinned.version,
    )


def _result(device: Device, state: str, before: str, record: dict[str, Any], start: float) -> DeviceResult:
    provenance = record.get("provenance") or {}
    return DeviceResult(
        device,
        state,
        before,
        version_label(record, provenance.get("registered_model")),
        time.perf_counter() - start,
        revision=record.get("revision"),
        runtime=record.get("runtime"),
        provenance=provenance,
        variant=record.get("variant"),
    )
