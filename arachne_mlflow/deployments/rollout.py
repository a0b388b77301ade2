"""Roll a model out over a fleet batch by batch, every updated device gated, and halt and undo on failure.

Each batch's devices are pushed in parallel (`push_device`), and each one that took the new version
passes the health gate (gate.py) before the next batch starts. A failed gate, more than
`max_failures` failed devices, or a canary batch where no device took the model halts the
rollout: every device updated in this rollout gets the version it replaced back (an instant
rollback on the device, no download) or, where the rollout created the model, loses it again; the
devices of later batches are left untouched. Devices already at the desired version were not
updated, so nothing is undone on them. Progress: a bar on a terminal, else a log line per batch.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from arachne_mlflow.deployments import gate
from arachne_mlflow.deployments.converge import on_devices, push_device, read_device
from arachne_mlflow.deployments.results import DEPLOYED, FAILED, ROLLED_BACK, UNTOUCHED, DeviceResult, version_label
from arachne_mlflow.deployments.source import ModelSource
from arachne_mlflow.deployments.strategy import CANARY, Strategy
from arachne_mlflow.deployments.targets import Settings
from arachne_mlflow.errors import ArachneError, HealthGateError
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device

_logger = logging.getLogger(__name__)
GATE_FAILED = "health gate failed: "  # the start of a device's error when its gate failed


@dataclass
class Rollout:
    """What a rollout did: each device's result (in the target's order) and why it halted."""

    results: list[DeviceResult]
    halted: str | None = None


def roll_out(
    devices: list[Device], settings: Settings, name: str, source: ModelSource, upload_progress: bool = False
) -> Rollout:
    """Bring `devices` to `source` as `name` with the settings' strategy (see the module's docstring)."""
    strategy, connection = settings.strategy, settings.connection
    batches = strategy.batches(devices)
    smoke = gate.smoke_of(source.model)
    results: dict[Device, DeviceResult] = {}
    halted = None

    def step(device: Device) -> DeviceResult:
        old = _old_latency(device, connection, name, source, strategy)
        if isinstance(old, DeviceResult):
            return old
        pushed = push_device(device, connection, name, source, upload_progress)
        return _gated(pushed, connection, name, smoke, strategy, old)

    progress = Progress(name, len(devices), len(batches), settings.progress)
    try:
        for number, batch in enumerate(batches, 1):
            batch_results = on_devices(batch, step, settings.workers(len(batch)))
            results.update((r.device, r) for r in batch_results)
            progress.batch(number, batch_results)
            halted = halt_reason(strategy, number, len(batches), batch_results, list(results.values()))
            if halted:
                break
    finally:
        progress.close()
    if halted:
        _logger.warning("rollout of %r halted: %s; rolling back the devices it updated", name, halted)
        undone = _undo(list(results.values()), connection, name, source, settings)
        results.update((r.device, r) for r in undone)
        rest = [d for d in devices if d not in results]
        results.update((r.device, r) for r in _untouched(rest, connection, name, source, settings))
    return Rollout([results[d] for d in devices], halted)


def undo_device(result: DeviceResult, connection: Connection, name: str, registered: str | None) -> DeviceResult:
    """Undo a rollout on a device it updated: the version it replaced served again (no download), or
    the model deleted where the rollout created it (`result.before` is "-")."""
    start = time.perf_counter()
    try:
        with connection.client(result.device) as client:
            if result.before == "-":
                client.delete_model(name)
                record = None
            else:
                record = client.rollback_model(name)
    except ArachneError as err:
        error = f"{result.error}; " if result.error else ""
        took = result.seconds + time.perf_counter() - start
        return replace(result, state=FAILED, error=f"{error}rolling it back failed: {err}", seconds=took, undone=True)
    took, after = time.perf_counter() - start, version_label(record, registered)
    _logger.info(
        "rollout of %r: %s %s in %.3f s", name, result.device, f"back at {after}" if record else "deleted", took
    )
    return replace(
        result,
        state=ROLLED_BACK,
        after=after,
        revision=record["revision"] if record else None,
        seconds=result.seconds + took,
        undone=True,
    )


def _old_latency(
    device: Device, connection: Connection, name: str, source: ModelSource, strategy: Strategy
) -> gate.Latency | DeviceResult | None:
    """With `gate_latency_regression`, the version `device` serves now, timed before the push (None:
    nothing to compare, or not asked); a failed device result, nothing pushed, when it cannot be timed."""
    if strategy.gate_latency_regression is None:
        return None
    start, label = time.perf_counter(), "?"
    registered = source.registry.registered_model if source.registry else None
    try:
        with connection.client(device) as client:
            record = client.model_record(name)
        if record is None or record.get("follow") or _holds(record, source):
            return None  # a create, a pulling device or an unchanged one: push_device says which
        label = version_label(record, registered)
        return gate.baseline(device, connection, name, label, strategy)
    except ArachneError as err:
        error = f"timing the version it serves before the push failed (gate_latency_regression): {err}"
        return DeviceResult(device, FAILED, label, label, _since(start), error=error)


def _gated(
    result: DeviceResult,
    connection: Connection,
    name: str,
    smoke: gate.Smoke,
    strategy: Strategy,
    old: gate.Latency | None = None,
):
    """A device that took the new version counts as deployed once it passes the gate."""
    if result.state != DEPLOYED:
        return result
    start = time.perf_counter()
    try:
        gate.check(result.device, connection, name, smoke, strategy)
        gate.check_latency(result.device, connection, name, result.after, strategy, old)
    except HealthGateError as err:
        return replace(result, state=FAILED, error=GATE_FAILED + str(err), seconds=result.seconds + _since(start))
    return replace(result, seconds=result.seconds + _since(start))


def halt_reason(strategy: Strategy, number: int, batches: int, batch: list[DeviceResult], so_far: list[DeviceResult]):
    """Why the rollout stops after batch `number` (None: it goes on)."""
    where = f"in batch {number} of {batches}"
    gated = [r for r in batch if _gate_failed(r)]
    if gated:
        names = ", ".join(str(r.device) for r in gated)
        return f"the health gate failed on {names} {where} ({gated[0].error[len(GATE_FAILED) :]})"
    failed = sum(r.state == FAILED for r in so_far)
    if strategy.max_failures is not None and failed > strategy.max_failures:
        return f"{failed} failed devices by batch {number} of {batches}, more than max_failures={strategy.max_failures}"
    if strategy.name == CANARY and number == 1 and not any(r.ok for r in batch):
        return f"no canary device took the model ({', '.join(f'{r.device}: {r.error}' for r in batch)})"
    return None


def _undo(
    results: list[DeviceResult], connection: Connection, name: str, source: ModelSource, settings: Settings
) -> list[DeviceResult]:
    """Roll back every device this rollout updated, including one whose push failed after the device
    had switched (an answer lost on the way: its record says so)."""
    updated = [r for r in results if r.state == DEPLOYED or _gate_failed(r)]
    unsure = [r for r in results if r.state == FAILED and not _gate_failed(r)]
    records = on_devices(unsure, lambda r: read_device(r.device, connection, name), settings.workers(len(unsure)))
    updated += [r for r, record in zip(unsure, records) if _holds(record, source)]
    registered = source.registry.registered_model if source.registry else None
    return on_devices(updated, lambda r: undo_device(r, connection, name, registered), settings.workers(len(updated)))


def _untouched(
    devices: list[Device], connection: Connection, name: str, source: ModelSource, settings: Settings
) -> list[DeviceResult]:
    """Results for the devices a halted rollout never reached, with what they run."""
    probing = connection.probing()
    records = on_devices(devices, lambda d: read_device(d, probing, name), settings.workers(len(devices)))
    registered = source.registry.registered_model if source.registry else None
    found = []
    for device, record in zip(devices, records):
        label = "?" if isinstance(record, ArachneError) else version_label(record, registered)
        found.append(DeviceResult(device, UNTOUCHED, label, label))
    return found


def _holds(record: Any, source: ModelSource) -> bool:
    return isinstance(record, dict) and (record.get("digest"), record.get("provenance")) == (
        source.digest,
        source.provenance,
    )


def _gate_failed(result: DeviceResult) -> bool:
    return result.state == FAILED and (result.error or "").startswith(GATE_FAILED)


def _since(start: float) -> float:
    return time.perf_counter() - start


class Progress:
    """Per batch (a staged pull's wave): a tqdm bar on a terminal (or with `-C progress=true`), else one log line."""

    def __init__(self, name: str, devices: int, batches: int, wanted: bool | None, step: str = "batch"):
        self.name, self.batches, self.bar, self.step = name, batches, None, step
        if sys.stderr.isatty() if wanted is None else wanted:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=devices, unit="device", desc=f"rollout {name}", file=sys.stderr)

    def batch(self, number: int, results: list[DeviceResult]) -> None:
        states: dict[str, int] = {}
        for result in results:
            states[result.state] = states.get(result.state, 0) + 1
        counted = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        if self.bar is not None:
            self.bar.update(len(results))
            self.bar.set_postfix_str(f"{self.step} {number}/{self.batches}: {counted}")
        else:
            devices = ", ".join(str(r.device) for r in results)
            _logger.info(
                "rollout of %r: %s %d of %d (%s): %s", self.name, self.step, number, self.batches, devices, counted
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
