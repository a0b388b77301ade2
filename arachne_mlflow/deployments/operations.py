"""Fleet commands: push a model to a target and record it in the registry, delete, and `fleet sync`.

The plugin's `create`/`update`/`delete` and `arachne-mlflow fleet sync` share these, so a push
from either records the same desired state, and every command ends with the same per-device
outcome, which fails unless enough devices (`min_success`, default all) reached what was wanted.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments import report
from arachne_mlflow.deployments.converge import delete_device, on_devices, unchanged_device, verify_if_trusted
from arachne_mlflow.deployments.desired_state import (
    DELETING,
    HALTED,
    ROLLED_OUT,
    ROLLING,
    Broken,
    Desired,
    DesiredState,
)
from arachne_mlflow.deployments.results import FAILED, FORGOTTEN, NEVER_HAD, PULLING, UNTOUCHED, DeviceResult
from arachne_mlflow.deployments.rollout import roll_out
from arachne_mlflow.deployments.source import RegistryVersion, registry_version, resolve
from arachne_mlflow.deployments.staged_view import staged_rollout
from arachne_mlflow.deployments.strategy import Strategy
from arachne_mlflow.deployments.targets import SCHEME, Settings, resolve_target
from arachne_mlflow.errors import ArachneError
from arachne_mlflow.fleet.device import Device

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
    halted: str | None = None  # why the rollout stopped and undid itself (rollout.py)
    staged: str | None = None  # a staged pull rollout holds the deployment (staged_view.py): nothing was done
    note: str = ""
    usage: bool = False  # the error is the command's (a deployment name the registry does not know)

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.registry_error is None
            and self.halted is None
            and self.staged is None
            and self.succeeded >= self.required
        )

    def headline(self) -> str:
        what = f"{self.action} of deployment {self.deployment!r}"
        if self.error:
            return f"{what} failed: {self.error}"
        if not self.results and (self.note or self.halted or self.staged):
            return f"{what}: {self.staged or self.halted or self.note}"
        wanted = "without it" if self.action == "delete" else f"with {self.wanted()}"
        line = f"{what}: {self.succeeded} of {len(self.results)} devices {wanted}"
        if self.halted:
            line = f"{what} ({self.wanted()}) halted: {self.halted}; {report.by_state(self.results)}"
        if self.required < len(self.results):
            line += f" ({self.required} required)"
        if self.registry_error:
            line += f"; the registry could not record it: {self.registry_error}"
        elif self.desired is not None and self.desired.status == DELETING:
            line += (
                "; the registry keeps it as deleting until every device is done "
                "(-C forget=true forgets devices that cannot be reached)"
            )
        if self.note:
            line += f"; {self.note}"
        return line

    def wanted(self) -> str:
        if self.registry is not None:
            return f"{self.registry.registered_model} v{self.registry.version}"
        return self.provenance.get("model_uri", "the model")

    def summary(self) -> str:
        """The headline and the failed devices with their errors (what an exception says)."""
        failed = report.failures([r for r in self.results if r.error])
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
    whole: bool = True,
) -> Outcome:
    """Bring every device to `model_uri` and record what happened when it is a registry model (not
    while a staged pull rollout holds the alias `model_uri` names: `_staged`).

    The registry is a ledger: a command on the deployment's `whole` target (or a new one) records
    the desired state, unless no device got the model of a deployment not yet recorded (nothing is
    recorded then); a command on part of it records its devices' entries only, and the
    deployment's target and model stay as they were. A push of a model outside the registry (a
    path, a run) records nothing, and forgets any desired state `existing` held for the same
    deployment on its whole target: `fleet sync` would undo it otherwise.
    """
    outcome = Outcome(action, name, required=settings.required(len(devices)))
    outcome.staged = _staged(model_uri, devices, state)
    if outcome.staged:
        return outcome
    pinned = registry_version(model_uri, state.client if state else None)
    shortcut = pinned is not None and settings.variants is None  # a new order may choose other variants
    outcome.results = _everywhere_already(name, model_uri, pinned, devices, settings) if shortcut else None
    if outcome.results is not None:  # nothing to push: not even a download
        outcome.registry, outcome.runtime = pinned, outcome.results[0].runtime
        outcome.provenance = outcome.results[0].provenance or {}
    else:
        with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
            client = state.client if state else None
            source = resolve(model_uri, tmp, client=client, pinned=pinned, variant_order=settings.variants)
            verify_if_trusted(source, settings)
            progress = settings.progress
            if progress is None:
                progress = sys.stderr.isatty() and source.size >= PROGRESS_MIN_BYTES
            rollout = roll_out(devices, settings, name, source, progress)
            outcome.results, outcome.halted = rollout.results, rollout.halted
        outcome.registry, outcome.provenance, outcome.runtime = source.registry, source.provenance, source.model.runtime
    if state is None:
        return outcome
    try:
        _record_push(outcome, model_uri, target, settings, state, existing, whole)
    except MlflowException as err:  # (a user who may read the registry but not write it: 403)
        outcome.registry_error = str(err)
    return outcome


def _staged(model_uri: str, devices: Sequence[Device], state: DesiredState | None) -> str | None:
    """What a staged pull rollout of `model_uri`'s alias says, where one holds it: `fleet pull-rollout`
    records the deployment when its waves are done, and until then the devices not admitted run the
    `from` version by design, so a push (or a sync) records nothing and is not done. None without
    one, or where the registry cannot say (the push then says what is wrong)."""
    try:
        staged = staged_rollout(model_uri, state.client, devices) if state is not None else None
    except MlflowException:
        return None
    return staged.describe() if staged is not None else None


def _record_push(
    outcome: Outcome,
    model_uri: str,
    target: str,
    settings: Settings,
    state: DesiredState,
    existing: Desired | None,
    whole: bool,
) -> None:
    touched = [r for r in outcome.results if r.state != UNTOUCHED]
    if outcome.registry is None:
        if existing is not None and whole:
            state.remove(existing)
        return
    if not whole:
        _record_part(outcome, settings, state, existing, touched)
        return
    if existing is None and outcome.succeeded == 0:
        outcome.note = f"nothing recorded in the registry: no device got {outcome.wanted()}"
        return
    outcome.desired = desired_after(outcome.deployment, model_uri, target, outcome, settings.strategy, existing)
    outcome.desired.variants = list(settings.variants) if settings.variants else None
    state.save(outcome.desired)
    state.record_devices(outcome.desired, outcome.registry.version, touched)


def _record_part(
    outcome: Outcome, settings: Settings, state: DesiredState, existing: Desired, touched: list[DeviceResult]
) -> None:
    """A command on some of the deployment's devices: their entries, then the deployment's status
    and counts as the ledger now says (its target and model URI unchanged)."""
    registry = outcome.registry
    if registry.registered_model != existing.registered_model:
        outcome.note = (
            f"nothing recorded: deployment {existing.deployment!r} deploys {existing.registered_model}, "
            f"not {registry.registered_model} (update its whole target with -C retarget=true to change it)"
        )
        return
    state.record_devices(existing, registry.version, touched)
    if registry.version == existing.version and existing.status in (ROLLING, ROLLED_OUT):
        outcome.desired = refreshed(existing, settings, state)


def refreshed(existing: Desired, settings: Settings, state: DesiredState) -> Desired:
    """`existing` with its status and counts as the version tags say of its target's devices (a
    target the fleet file cannot resolve any more: left as it is)."""
    try:
        devices = resolve_target(f"{SCHEME}://{existing.target}", settings.fleet, recorded=True)
    except ArachneError:
        return existing
    recorded = state.recorded(existing)
    having = {"deployed", PULLING}
    missing = [str(d) for d in devices if recorded.get(str(d), {}).get(existing.version, {}).get("state") not in having]
    after = replace(existing, updated_at="")
    after.devices = {"deployed": len(devices) - len(missing), **({"missing": len(missing)} if missing else {})}
    after.status, after.reason = ROLLED_OUT, ""
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        after.status = ROLLING
        after.reason = f"{len(missing)} of {len(devices)} devices without v{existing.version}: {shown}"
    state.save(after)
    return after


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
    whole: bool = True,
) -> Outcome:
    """Remove `name` from every device; the registry forgets it once no device has it.

    A device that could not be reached but never had the deployment (the ledger lists only its
    failures) needs no cleaning; with `-C forget=true`, a device that could not be reached is
    forgotten all the same (it may still serve the model). On the `whole` target, until every
    device is done the desired state says `deleting`, so that `fleet sync` finishes the job
    instead of putting the model back; on part of it, those devices' entries go and the
    deployment stays.
    """
    connection = settings.connection
    results = on_devices(devices, lambda d: delete_device(d, connection, name), settings.workers(len(devices)))
    outcome = Outcome("delete", name, results, required=settings.required(len(devices)))
    if existing is None or state is None:
        if settings.forget:
            _forget_failed(results)
        return outcome
    try:
        ledger = state.recorded(existing)
        for result in results:
            entries = ledger.get(str(result.device), {}).values()
            if result.state == FAILED and all(e.get("state") == FAILED for e in entries):
                result.state, result.after = NEVER_HAD, "-"
        if settings.forget:
            _forget_failed(results)
        done = [str(r.device) for r in results if r.ok]
        if not whole:
            state.forget_devices(existing, done)
        elif all(r.ok for r in results):
            state.remove(existing)
        else:
            existing.status = DELETING
            existing.reason = f"{len(results) - outcome.succeeded} devices still have it: {report.failures(results)}"
            existing.devices = counts(results, "deleted")
            state.save(existing)
            state.forget_devices(existing, done)
            outcome.desired = existing
    except MlflowException as err:
        outcome.registry_error = str(err)
    return outcome


def _forget_failed(results: list[DeviceResult]) -> None:
    for result in results:
        if result.state == FAILED:
            result.state = FORGOTTEN


def forget(name: str, state: DesiredState, existing: Desired | None) -> Outcome:
    """Forget deployment `name` without contacting a device (its target names nothing the fleet
    file knows any more): its record, and any tag of that name that is not a desired state."""
    outcome = Outcome("delete", name)
    if existing is not None:
        state.remove(existing)
    removed = state.remove_broken(name)
    if existing is None and not removed:
        outcome.error = "the registry records no such deployment"
    else:
        outcome.note = "forgotten by the registry; no device was contacted"
    return outcome


def sync(names: Sequence[str], settings: Settings, state: DesiredState, stream: TextIO | None = None) -> list[Outcome]:
    """Converge every deployment the registry records (or those in `names`) and report each.

    A moved alias rolls out, a device that was down gets the model, a device added to a group
    gets it; a deployment that is already everywhere is left alone (nothing is written). A
    `halted` rollout stays halted until a command starts it again, and a staged pull rollout under
    way is `fleet pull-rollout`'s (`push`: reported, not done). A tag that is not a desired state
    this tool wrote, or a target naming what the fleet file does not know, is reported for
    that deployment (nothing is contacted for it) and the others converge.
    """
    found, broken = state.scan()
    recorded = [d for d in found if not names or d.deployment in names]
    broken = [b for b in broken if not names or b.deployment in names]
    missing = sorted(set(names) - {d.deployment for d in recorded} - {b.deployment for b in broken})
    outcomes = [_broken(b) for b in broken]
    for desired in recorded:
        if desired.status == HALTED:
            outcome = _halted(desired, settings, state)
        else:
            outcome = _sync_one(desired, settings, state)
        outcomes.append(outcome)
    unknown = [Outcome("sync", n, error="no such deployment in the registry", usage=True) for n in missing]
    for outcome in outcomes + unknown:
        if settings.report:
            outcome.write(stream)
    return outcomes + unknown


def _broken(broken: Broken) -> Outcome:
    return Outcome("sync", broken.deployment, error=f"{broken.error} (nothing was contacted for it)")


def _halted(desired: Desired, settings: Settings, state: DesiredState) -> Outcome:
    """A halted deployment, left as it is: or, where `fleet pull-rollout` started it again, that rollout."""
    why = f"the rollout halted ({desired.reason}); left as it is until a command starts it again"
    try:
        devices = resolve_target(f"{SCHEME}://{desired.target}", settings.fleet, recorded=True)
    except ArachneError:
        return Outcome("sync", desired.deployment, halted=why)
    staged = _staged(desired.model_uri, devices, state)
    return Outcome("sync", desired.deployment, staged=staged, halted=None if staged else why)


def _sync_one(desired: Desired, settings: Settings, state: DesiredState) -> Outcome:
    try:
        devices = resolve_target(f"{SCHEME}://{desired.target}", settings.fleet, recorded=True)
        if desired.status == DELETING:
            return delete(desired.deployment, devices, settings, state, desired)
        recorded = tuple(desired.variants) if desired.variants else None
        settings = replace(settings, strategy=Strategy.from_recorded(desired.strategy), variants=recorded)  # as pushed
        return push("sync", desired.deployment, desired.model_uri, desired.target, devices, settings, state, desired)
    except (ArachneError, MlflowException) as err:  # a group gone, an alias deleted: the others go on
        return Outcome("sync", desired.deployment, error=str(err))


def desired_after(
    name: str, model_uri: str, target: str, outcome: Outcome, strategy: Strategy, existing: Desired | None
) -> Desired:
    """The desired state after a push: rolled out, rolling (devices without it) or halted; with the
    version the deployment ran before, for `fleet rollback`."""
    registry, results = outcome.registry, outcome.results  # (a registry model's outcome)
    failed = [r for r in results if not r.ok]
    status, reason = ROLLED_OUT, ""
    if outcome.halted:
        status, reason = HALTED, f"v{registry.version} halted: {outcome.halted}; {report.by_state(results)}"
    elif failed:
        status = ROLLING
        reason = f"{len(failed)} of {len(results)} devices without v{registry.version}: {report.failures(failed)}"
    previous = existing.previous_version if existing else None
    same_model = existing is not None and existing.registered_model == registry.registered_model
    if same_model and existing.status != HALTED and existing.version not in (None, registry.version):
        previous = existing.version  # (a halted version never ran: the one before it stays the previous)
    return Desired(
        name,
        registry.registered_model,
        target,
        model_uri,
        status=status,
        reason=reason,
        version=registry.version,
        previous_version=previous if same_model else None,
        devices=counts(results),
        strategy=strategy.to_dict(),
    )


def counts(results: list[DeviceResult], done: str = "deployed") -> dict[str, int]:
    """How many devices are in the wanted state (`done`) and how many are not, by state: states, not
    actions, so that a second run that changes nothing records the same counts."""
    found: dict[str, int] = {}
    for result in results:
        state = done if result.ok else result.state  # failed, rolled-back (a halted rollout), untouched
        found[state] = found.get(state, 0) + 1
    return found
