"""Staged pull rollouts: a new version goes to a fleet of pulling devices in waves, through what they read.

The devices follow `models:/REG@ALIAS` (`serve --follow`) and need not be reachable from here; the host
speaks to them only through the registry (protocol/staged_pull.py):

1. the version the alias names now is the `from` version; the new version gets the rollout tag,
   admitting nobody yet, and then the alias moves to it (so no device takes it before its wave);
   a run that goes on with an interrupted rollout keeps the devices it had admitted;
2. the target's devices, ordered by the position each one computes for itself, are cut into the
   strategy's batches (strategy.py: `all`, `rolling`, `canary`, the same `-C` keys as a push); per wave
   the tag's `admit` rises just past the wave's last device, and the host waits for the wave's own
   records (a run per device in `arachne-devices`) to say the new version is `deployed` or `failed`
   (the device's smoke test is its health gate: a failure halts, like a failed gate); a device with no
   record by `wave_timeout` failed (like an unreachable device: it halts only past `max_failures`, or
   when no canary device took the version);
3. a halt moves the alias back to `from` and marks the tag halted: the devices that took the new version
   go back (their store's rollback, no download), the others never left it; the host waits for their
   records to say so;
4. after the last wave the tag goes: the alias alone says what every device runs.

The outcome is recorded as a push's is (the desired state on the registered model, `halted` with its
reason); the devices' own records are the per-device ledger. Interrupted, the command leaves the tag
as it was (no device beyond the admitted ones moves); run it again to go on (the waves admitted
before pass as soon as their records say so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from arachne_mlflow.deployments.desired_state import Desired, DesiredState
from arachne_mlflow.deployments.operations import Outcome, desired_after
from arachne_mlflow.deployments.results import DEPLOYED, FAILED, ROLLED_BACK, UNKNOWN, UNTOUCHED, DeviceResult
from arachne_mlflow.deployments.rollout import GATE_FAILED, Progress, halt_reason
from arachne_mlflow.deployments.source import RegistryVersion, registry_version
from arachne_mlflow.deployments.strategy import ROLLOUT_KEYS, config_seconds
from arachne_mlflow.deployments.targets import Settings, settings
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.protocol import device_records
from arachne_mlflow.protocol.staged_pull import HALTED, ROLLOUT_TAG, RolloutTag, admit_after, position

_logger = logging.getLogger(__name__)
DEFAULT_WAVE_TIMEOUT = 900.0  # a device's interval, its spread window and a download, with room to spare
DEFAULT_POLL = 5.0  # seconds between two reads of the wave's records
MAX_SECONDS = 86400.0
PULL_KEYS = ("wave_timeout", "poll")
# the push keys that mean something here: the gate's timing keys need to reach the device
_STRATEGY_KEYS = ("strategy", "batch", "canary", "max_failures")
_OTHER_KEYS = ("fleet", "min_success", "progress", "report")


@dataclass(frozen=True)
class PullPlan:
    """One staged pull rollout: which alias moves from which version to which, over which devices."""

    deployment: str
    registered_model: str
    alias: str
    version: str
    from_version: str
    target: str
    admitted: float = 0.0  # how far an interrupted run of the same rollout had admitted (never lowered)


@dataclass(frozen=True)
class Waits:
    """How long a wave's devices have to report, and how often their records are read meanwhile."""

    wave_timeout: float = DEFAULT_WAVE_TIMEOUT
    poll: float = DEFAULT_POLL


def pull_settings(config: Mapping[str, Any]) -> tuple[Settings, Waits]:
    """The command's settings from `-C key=value`: the strategy's keys, `wave_timeout` and `poll`."""
    allowed = {*_STRATEGY_KEYS, *_OTHER_KEYS, *PULL_KEYS}
    unknown = sorted(set(config) - allowed)
    if unknown:
        pushed = [k for k in unknown if k in ROLLOUT_KEYS]
        why = f" ({', '.join(pushed)}: the host cannot time a device it does not reach)" if pushed else ""
        raise InvalidInputError(f"unknown config {unknown} for a staged pull{why}; known: {sorted(allowed)}")
    waits = Waits(
        *(
            config_seconds(config, key, default, maximum=MAX_SECONDS)
            for key, default in zip(PULL_KEYS, (DEFAULT_WAVE_TIMEOUT, DEFAULT_POLL))
        )
    )
    return settings({k: v for k, v in config.items() if k not in PULL_KEYS}), waits


def plan_of(deployment: str, model_uri: str, alias: str, target: str, client: Any) -> PullPlan:
    """The rollout of `model_uri` (pinned to one registered version) to the devices following `alias`:
    from the version the alias names now, or, where the alias names that version already under a
    rollout tag, from that rollout's `from` version: where it left off (an interrupted command), or
    from the start (a halted tag: the devices run `from`)."""
    from mlflow.exceptions import MlflowException

    pinned = registry_version(model_uri, client)
    if pinned is None:
        raise InvalidInputError(
            f"a staged pull rolls out a registered model's version (models:/NAME/3), not {model_uri!r}"
        )
    name, version = pinned.registered_model, pinned.version
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise InvalidInputError(
            f"registered model {name!r} has no alias {alias!r} for the devices to follow: set it to the version they "
            f"run first (a staged rollout moves the fleet from one version to another): {err.message}"
        ) from err
    origin, admitted = str(current.version), 0.0
    tag = RolloutTag.parse(current.tags.get(ROLLOUT_TAG)) if origin == version else None
    if tag is not None and tag.alias == alias and tag.from_version:
        origin, admitted = tag.from_version, (0.0 if tag.state == HALTED else tag.admit)
    return PullPlan(deployment, name, alias, version, origin, target, admitted)


def ordered(devices: Sequence[Device], registered_model: str) -> list[Device]:
    """`devices` in the order a staged rollout admits them (each device's own `position`)."""
    return sorted(devices, key=lambda d: position(registered_model, str(d)))


def pull_rollout(
    plan: PullPlan,
    devices: Sequence[Device],
    options: Settings,
    waits: Waits,
    state: DesiredState,
    existing: Desired | None = None,
) -> Outcome:
    """Roll `plan` out wave by wave (see the module's docstring); the outcome, recorded in the registry."""
    fleet = ordered(devices, plan.registered_model)
    outcome = Outcome("pull-rollout", plan.deployment, required=options.required(len(fleet)))
    outcome.registry = RegistryVersion(plan.registered_model, plan.version, plan.alias)
    outcome.provenance = {"model_uri": f"models:/{plan.registered_model}@{plan.alias}"}
    records = _Records(state.client, plan)
    results, outcome.halted = _waves(plan, fleet, options, waits, state.client, records)
    if outcome.halted:
        _logger.warning("rollout of %r halted: %s; moving the alias back", plan.deployment, outcome.halted)
        results = _move_back(plan, fleet, results, waits, state.client, records)
    else:
        state.client.delete_model_version_tag(plan.registered_model, plan.version, ROLLOUT_TAG)
    outcome.results = [results[str(d)] for d in fleet]
    model_uri = outcome.provenance["model_uri"]
    outcome.desired = desired_after(plan.deployment, model_uri, plan.target, outcome, options.strategy, existing)
    state.save(outcome.desired)
    return outcome


def _waves(plan: PullPlan, fleet: list[Device], options: Settings, waits: Waits, client: Any, records: _Records):
    """Admit the waves one after the other; each device's result, and why the rollout halted (or None)."""
    strategy = options.strategy
    batches = strategy.batches(fleet)
    positions = [position(plan.registered_model, str(d)) for d in fleet]
    tag = RolloutTag(plan.alias, plan.from_version, plan.admitted)
    client.set_model_version_tag(plan.registered_model, plan.version, ROLLOUT_TAG, tag.to_json())
    client.set_registered_model_alias(plan.registered_model, plan.alias, plan.version)
    results: dict[str, DeviceResult] = {}
    progress = Progress(plan.deployment, len(fleet), len(batches), options.progress, step="wave")
    admitted = 0
    try:
        for number, batch in enumerate(batches, 1):
            admitted += len(batch)
            tag = replace(tag, admit=max(plan.admitted, admit_after(positions, admitted - 1)), wave=number)
            client.set_model_version_tag(plan.registered_model, plan.version, ROLLOUT_TAG, tag.to_json())
            wave = _await(batch, plan, records, waits)
            results.update((str(r.device), r) for r in wave)
            progress.batch(number, wave)
            halted = halt_reason(strategy, number, len(batches), wave, list(results.values()))
            if halted:
                return results, halted
    finally:
        progress.close()
    return results, None


def _await(wave: list[Device], plan: PullPlan, records: _Records, waits: Waits) -> list[DeviceResult]:
    """The wave's results once each device's record says the new version is deployed or failed, or the
    wave's time is up."""
    start = time.monotonic()
    found: dict[str, DeviceResult] = {}
    before, after = f"v{plan.from_version}", f"v{plan.version}"
    while True:
        entries = records.of_version(plan.version)
        for device in wave:
            entry = entries.get(str(device))
            if str(device) in found or entry is None:
                continue
            took = time.monotonic() - start
            if entry["state"] == "deployed":
                revision, variant = entry.get("revision"), entry.get("variant")
                found[str(device)] = DeviceResult(
                    device, DEPLOYED, before, after, took, revision=revision, variant=variant
                )
            elif entry["state"] == "failed":
                error = f"{GATE_FAILED}the device refused it: {entry.get('error') or 'no reason given'}"
                found[str(device)] = DeviceResult(device, FAILED, before, before, took, error=error)
        if len(found) == len(wave) or time.monotonic() - start >= waits.wave_timeout:
            break
        time.sleep(min(waits.poll, max(0.0, waits.wave_timeout - (time.monotonic() - start))))
    silent = f"no record of {after} from the device within {waits.wave_timeout:g} s (wave_timeout)"
    took = time.monotonic() - start
    return [found.get(str(d)) or DeviceResult(d, FAILED, UNKNOWN, UNKNOWN, took, error=silent) for d in wave]


def _move_back(
    plan: PullPlan, fleet: list[Device], results: dict[str, DeviceResult], waits: Waits, client: Any, records: _Records
) -> dict[str, DeviceResult]:
    """The alias back at `from`, the tag halted; the devices that took the new version awaited back at
    `from`; every other device of the target reported with what its record says it runs."""
    client.set_registered_model_alias(plan.registered_model, plan.alias, plan.from_version)
    halted = RolloutTag(plan.alias, plan.from_version, 0.0, state=HALTED)
    client.set_model_version_tag(plan.registered_model, plan.version, ROLLOUT_TAG, halted.to_json())
    took = [r for r in results.values() if r.state == DEPLOYED]
    start, back = time.monotonic(), {}
    while True:
        entries = records.of_version(plan.from_version)
        back.update((r.device, entries[str(r.device)]) for r in took if _deployed(entries.get(str(r.device))))
        if len(back) == len(took) or time.monotonic() - start >= waits.wave_timeout:
            break
        time.sleep(waits.poll)
    moved = dict(results)
    for result in took:
        if result.device in back:
            entry = back[result.device]
            after = f"v{plan.from_version}"
            revision = entry.get("revision")
            moved[str(result.device)] = replace(result, state=ROLLED_BACK, after=after, revision=revision, undone=True)
        else:
            error = f"it did not report v{plan.from_version} again within {waits.wave_timeout:g} s"
            moved[str(result.device)] = replace(result, state=FAILED, error=error, undone=True)
    last = records.latest()
    for device in fleet:
        if str(device) not in moved:
            entry = last.get(str(device))
            label = f"v{entry['version']}" if _deployed(entry) else UNKNOWN
            moved[str(device)] = DeviceResult(device, UNTOUCHED, label, label)
    return moved


def _deployed(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry.get("state") == "deployed"


class _Records:
    """The pulling devices' own records of the deployment (protocol/device_records.py), read with MLflow."""

    def __init__(self, client: Any, plan: PullPlan):
        self.client, self.plan = client, plan
        self._experiment: str | None = None

    def of_version(self, version: str) -> dict[str, dict[str, Any]]:
        """device -> entry, for the devices whose record is about `version`."""
        return self._search(f" AND tags.`{device_records.VERSION}` = '{int(version)}'")

    def latest(self) -> dict[str, dict[str, Any]]:
        return self._search("")

    def _search(self, extra: str) -> dict[str, dict[str, Any]]:
        if self._experiment is None:
            experiment = self.client.get_experiment_by_name(device_records.EXPERIMENT)
            if experiment is None:
                return {}
            self._experiment = experiment.experiment_id
        query = device_records.search_filter(self.plan.deployment) + extra
        found, token = {}, None
        while True:
            page = self.client.search_runs([self._experiment], query, max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                entry = device_records.parse_entry(tags)
                if entry is not None and tags.get(device_records.MODEL) == self.plan.registered_model:
                    found[tags[device_records.DEVICE]] = entry
            token = page.token
            if not token:
                return found
