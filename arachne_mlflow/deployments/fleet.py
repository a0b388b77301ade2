"""Fleet commands: push a model to a target and record it in the registry, delete, and `fleet sync`.

The plugin's `create`/`update`/`delete` and `arachne-mlflow fleet sync` share these, so a push
from either records the same desired state, and every command ends with the same per-device
outcome, which fails unless enough devices (`min_success`, default all) reached what was wanted.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments import report
from arachne_mlflow.deployments.converge import DeviceResult, converge, delete_device, on_devices, unchanged_device
from arachne_mlflow.deployments.desired_state import DELETING, HALTED, ROLLED_OUT, ROLLING, Desired, DesiredState
from arachne_mlflow.deployments.inventory import resolve_target
from arachne_mlflow.deployments.source import RegistryVersion, registry_version, resolve
from arachne_mlflow.deployments.targets import SCHEME, Device, Settings
from arachne_mlflow.errors import ArachneError

# Models at least this large get a progress bar when stderr is a terminal (`-C progress=...` decides otherwise).
PROGRESS_MIN_BYTES = 1 << 20


@dataclass
class Outcome:
    """What one command did to one deployment on every device of its target."""

    action: str
    deployment: str
    results: list[DeviceResult] = field(default_factory=list)
    required: int = 0
    registry: RegistryVersion | None = None  # the registered version pushed (None: not a registry model)
    provenance: dict[str, Any] = field(default_factory=dict)  # what each device records with the model
    runtime: str | None = None
    desired: Desired | None = None  # what the registry records now (None: nothing recorded)
    error: str | None = None  # the deployment as a whole failed (no device was tried)
    registry_error: str | None = None  # the devices were dealt with, but the registry could not record it
    note: str = ""

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def ok(self) -> bool:
        return self.error is None and self.registry_error is None and self.succeeded >= self.required

    def headline(self) -> str:
        what = f"{self.action} of deployment {self.deployment!r}"
        if self.error:
            return f"{what} failed: {self.error}"
        if self.note and not self.results:
            return f"{what}: {self.note}"
        wanted = "without it" if self.action == "delete" else f"with {self.wanted()}"
        line = f"{what}: {self.succeeded} of {len(self.results)} devices {wanted}"
        if self.required < len(self.results):
            line += f" ({self.required} required)"
        if self.registry_error:
            line += f"; the registry could not record it: {self.registry_error}"
        return line

    def wanted(self) -> str:
        if self.registry is not None:
            return f"{self.registry.registered_model} v{self.registry.version}"
        return self.provenance.get("model_uri", "the model")

    def summary(self) -> str:
        """The headline and the failed devices with their errors (what an exception says)."""
        failed = report.failures(self.results)
        return self.headline() + (f"; failed on {failed}" if failed else "")

    def write(self, stream: TextIO | None = None) -> None:
        text = self.headline() + "\n"
        if self.results:
            text += report.results_table(self.results)
        report.write(text, stream)


def push(
    action: str,
    name: str,
    model_uri: str,
    target: str,
    devices: Sequence[Device],
    settings: Settings,
    state: DesiredState | None,
    existing: Desired | None = None,
) -> Outcome:
    """Bring every device to `model_uri` and record the desired state when it is a registry model.

    A push of a model outside the registry (a path, a run) records nothing, and forgets any
    desired state `existing` held for the same deployment: `fleet sync` would undo it otherwise.
    """
    outcome = Outcome(action, name, required=settings.required(len(devices)))
    pinned = registry_version(model_uri, state.client if state else None)
    parallel = settings.workers(len(devices))
    outcome.results = _everywhere_already(name, model_uri, pinned, devices, settings) if pinned else None
    if outcome.results is not None:  # nothing to push: not even a download
        outcome.registry, outcome.runtime = pinned, outcome.results[0].runtime
        outcome.provenance = outcome.results[0].provenance or {}
    else:
        with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
            source = resolve(model_uri, tmp, client=state.client if state else None, pinned=pinned)
            progress = settings.progress
            if progress is None:
                progress = sys.stderr.isatty() and source.size >= PROGRESS_MIN_BYTES
            outcome.results = converge(devices, settings.connection, name, source, parallel, progress)
        outcome.registry, outcome.provenance, outcome.runtime = source.registry, source.provenance, source.model.runtime
    if state is None:
        return outcome
    try:
        if outcome.registry is not None:
            outcome.desired = _desired(name, model_uri, target, outcome.registry, outcome.results)
            state.save(outcome.desired)
            state.record_devices(outcome.desired, outcome.registry.version, outcome.results)
        elif existing is not None:
            state.remove(existing)
    except MlflowException as err:  # (a user who may read the registry but not write it: 403)
        outcome.registry_error = str(err)
    return outcome


def _everywhere_already(
    name: str, model_uri: str, pinned: RegistryVersion, devices: Sequence[Device], settings: Settings
) -> list[DeviceResult] | None:
    """Every device's result when all of them already run `pinned` from `model_uri`, else None.

    A registered version's files never change, so its number and the URI it came from say what
    a device holds: a converged fleet costs one question per device and no download.
    """
    if not devices:
        return None
    connection = settings.connection
    results = on_devices(
        devices, lambda d: unchanged_device(d, connection, name, model_uri, pinned), settings.workers(len(devices))
    )
    return None if any(r is None for r in results) else results


def delete(
    name: str,
    devices: Sequence[Device],
    settings: Settings,
    state: DesiredState | None,
    existing: Desired | None,
) -> Outcome:
    """Remove `name` from every device; the registry forgets it once no device has it.

    Until then its desired state says `deleting`, so that `fleet sync` finishes the job on the
    devices that could not be reached instead of putting the model back on the others.
    """
    connection = settings.connection
    results = on_devices(devices, lambda d: delete_device(d, connection, name), settings.workers(len(devices)))
    outcome = Outcome("delete", name, results, required=settings.required(len(devices)))
    if existing is None or state is None:
        return outcome
    try:
        if all(r.ok for r in results):
            state.remove(existing)
            return outcome
        existing.status = DELETING
        existing.reason = f"{len(results) - outcome.succeeded} devices still have it: {report.failures(results)}"
        existing.devices = _counts(results, "deleted")
        state.save(existing)
        state.forget_devices(existing, [str(r.device) for r in results if r.ok])
        outcome.desired = existing
    except MlflowException as err:
        outcome.registry_error = str(err)
    return outcome


def sync(names: Sequence[str], settings: Settings, state: DesiredState, stream: TextIO | None = None) -> list[Outcome]:
    """Converge every deployment the registry records (or those in `names`) and report each.

    A moved alias rolls out, a device that was down gets the model, a device added to a group
    gets it; a deployment that is already everywhere is left alone (nothing is written). A
    `halted` rollout stays halted until a command starts it again.
    """
    recorded = [d for d in state.all() if not names or d.deployment in names]
    missing = sorted(set(names) - {d.deployment for d in recorded})
    outcomes = [Outcome("sync", n, error="no such deployment in the registry") for n in missing]
    for desired in recorded:
        if desired.status == HALTED:
            outcome = Outcome("sync", desired.deployment, note=f"halted ({desired.reason}); left as it is")
        else:
            outcome = _sync_one(desired, settings, state)
        if settings.report:
            outcome.write(stream)
        outcomes.append(outcome)
    for outcome in outcomes[: len(missing)]:
        if settings.report:
            outcome.write(stream)
    return outcomes


def _sync_one(desired: Desired, settings: Settings, state: DesiredState) -> Outcome:
    try:
        devices = resolve_target(f"{SCHEME}://{desired.target}", settings.fleet)
        if desired.status == DELETING:
            return delete(desired.deployment, devices, settings, state, desired)
        return push("sync", desired.deployment, desired.model_uri, desired.target, devices, settings, state, desired)
    except (ArachneError, MlflowException) as err:  # a group gone, an alias deleted: the others go on
        return Outcome("sync", desired.deployment, error=str(err))


def _desired(name: str, model_uri: str, target: str, registry: RegistryVersion, results: list[DeviceResult]) -> Desired:
    failed = [r for r in results if not r.ok]
    reason = ""
    if failed:
        reason = f"{len(failed)} of {len(results)} devices without v{registry.version}: {report.failures(failed)}"
    return Desired(
        name,
        registry.registered_model,
        target,
        model_uri,
        status=ROLLING if failed else ROLLED_OUT,
        reason=reason,
        version=registry.version,
        devices=_counts(results),
    )


def _counts(results: list[DeviceResult], done: str = "deployed") -> dict[str, int]:
    """How many devices are in the wanted state (`done`) and how many failed: states, not actions,
    so that a second run that changes nothing records the same counts."""
    ok = sum(r.ok for r in results)
    return {k: v for k, v in ((done, ok), ("failed", len(results) - ok)) if v}
