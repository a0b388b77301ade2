"""The health gate: a device that has switched to a new version counts as deployed only once it serves it.

Right after an upload the plugin asks the device, within `gate_timeout` seconds: is the model
ready, and does a smoke inference answer without error, with the outputs the model's signature
names, of its dtypes and shapes (-1 matches any)? Its inputs and checks are the one smoke policy
(model/smoke_policy.py) that a pulling device's smoke test uses too: the model's saved input
example when it fits, else generated inputs of the signature's specs. With `gate_seconds`, the device's error
counter for the model (`arachne_inference_errors_total` on its /metrics) is watched that long
after the switch: errors rising fail the gate, so a model that answers the smoke test but fails
the clients' requests is caught too.

The latency gate (`gate_max_p99_ms`, `gate_latency_regression`; nothing is timed without them) runs
the device's benchmark route on the new version after the switch: warm-up runs, then `gate_repeats`
runs timed on the device's own clock. The old version is timed the same way on the same device
before the push. Timings on a shared machine are noisy, so each side is the best of two runs (a
second run only where the first fails the check: the same decision, at no cost when it passes), and
a regression must show on the p99 and on the median, and by more than `NOISE_FLOOR_MS`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from arachne_mlflow.deployments.strategy import Strategy
from arachne_mlflow.deployments.targets import Connection, Device
from arachne_mlflow.errors import ArachneError, HealthGateError, InvalidInputError
from arachne_mlflow.model import smoke_policy
from arachne_mlflow.model.directory import ArachneModel
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.protocol.datatypes import from_datatype

ERRORS_METRIC = "arachne_inference_errors"
LATENCY_WARMUP = 3  # untimed runs before a latency measurement: first runs pay for allocations
NOISE_FLOOR_MS = 0.05  # a regression smaller than this is a scheduler's jitter, whatever its percentage
WATCH_INTERVAL = 0.5  # seconds between two looks at the error counter


@dataclass(frozen=True)
class Smoke:
    """What the gate sends (named arrays; None: random inputs of the device's own specs) and the
    outputs it expects (empty: those the device reports)."""

    inputs: Mapping[str, np.ndarray] | None
    outputs: Sequence[TensorSpec]


def smoke_of(model: ArachneModel) -> Smoke:
    """The smoke inference of `model`, made once per rollout, before any device is touched (a
    saved example that cannot be read fails the command there)."""
    if not model.inputs:  # no signature: the device's specs decide (at the gate)
        return Smoke(None, model.outputs)
    path = smoke_policy.example_path(model)
    example = smoke_policy.load_example(path) if path is not None else None
    inputs = smoke_policy.smoke_inputs(model.inputs, example)
    return Smoke({spec.name: value for spec, value in zip(model.inputs, inputs)}, model.outputs)


def check(device: Device, connection: Connection, name: str, smoke: Smoke, strategy: Strategy) -> None:
    """Raise `HealthGateError` unless `device` serves `name` healthily (see the module's docstring)."""
    started = time.monotonic()
    limit = strategy.gate_timeout

    def in_time() -> None:  # (each request waits at most `limit` too)
        took = time.monotonic() - started
        if took > limit:
            raise HealthGateError(f"{device} took {took:.1f} s to answer the smoke inference (gate_timeout={limit:g})")

    with replace(connection, timeout=limit).client(device) as client:
        try:
            if not client.model_ready(name):
                raise HealthGateError(f"model {name!r} is not ready on {device} after the switch")
            metadata = client.model_metadata(name)
            in_time()
            inputs = smoke.inputs
            if inputs is None:
                specs = _specs(metadata["inputs"])
                inputs = {spec.name: value for spec, value in zip(specs, smoke_policy.smoke_inputs(specs))}
            baseline = inference_errors(client.metrics(), name) if strategy.gate_seconds else 0.0
            outputs = client.infer(name, dict(inputs))
        except HealthGateError:
            raise
        except ArachneError as err:
            raise HealthGateError(f"the smoke inference of {name!r} on {device} failed: {err}") from err
        in_time()
        check_outputs(outputs, smoke.outputs or _specs(metadata["outputs"]))
        if strategy.gate_seconds:
            _watch(client, device, name, baseline, strategy.gate_seconds)


@dataclass(frozen=True)
class Latency:
    """A version's timing on a device, in ms: the p99 and the median of one benchmark call."""

    label: str  # the version timed (v1, or a digest's start)
    p99: float
    median: float

    def best(self, other: Latency) -> Latency:
        return Latency(self.label, min(self.p99, other.p99), min(self.median, other.median))


def time_model(client: Any, name: str, label: str, repeats: int) -> Latency:
    """`name` timed on the device (its benchmark route)."""
    result = client.benchmark(name, warmup=LATENCY_WARMUP, repeat=repeats)
    try:
        return Latency(label, float(result["p99"]), float(result["median"]))
    except (KeyError, TypeError, ValueError) as err:
        raise HealthGateError(f"the device's benchmark of {name!r} reported no p99 and median ({err})") from err


def baseline(device: Device, connection: Connection, name: str, label: str, strategy: Strategy) -> Latency | None:
    """The version (`label`) that `device` serves as `name` now, timed before the push (best of two
    runs) when the gate compares latencies; None when it does not."""
    if strategy.gate_latency_regression is None:
        return None
    with connection.client(device) as client:
        first = time_model(client, name, label, strategy.gate_repeats)
        return first.best(time_model(client, name, label, strategy.gate_repeats))


def check_latency(
    device: Device, connection: Connection, name: str, label: str, strategy: Strategy, old: Latency | None
) -> None:
    """Raise `HealthGateError` when the new version (`label`) is over the p99 budget, or slower than
    `old` by more than the allowed regression (see the module's docstring)."""
    if not strategy.times_latency:
        return
    with connection.client(device) as client:
        try:
            new = time_model(client, name, label, strategy.gate_repeats)
            if _latency_problem(new, old, strategy):
                new = new.best(time_model(client, name, label, strategy.gate_repeats))
        except HealthGateError:
            raise
        except ArachneError as err:
            raise HealthGateError(f"timing {name!r} on {device} failed: {err}") from err
    problem = _latency_problem(new, old, strategy)
    if problem:
        raise HealthGateError(f"{name!r} {label} on {device} is too slow: {problem}")


def _latency_problem(new: Latency, old: Latency | None, strategy: Strategy) -> str | None:
    budget, allowed = strategy.gate_max_p99_ms, strategy.gate_latency_regression
    if budget is not None and new.p99 > budget:
        return f"p99 {new.p99:.3g} ms over the {budget:g} ms budget (gate_max_p99_ms)"
    if allowed is None or old is None:
        return None
    slower = [
        new_ms > old_ms * (1 + allowed) and new_ms - old_ms > NOISE_FLOOR_MS
        for new_ms, old_ms in ((new.p99, old.p99), (new.median, old.median))
    ]
    if not all(slower):
        return None
    return (
        f"p99 {_change(new.p99, old.p99)} against {old.label}'s {old.p99:.3g} ms, median "
        f"{_change(new.median, old.median)} against {old.median:.3g} ms (gate_latency_regression={allowed * 100:g}%)"
    )


def _change(new: float, old: float) -> str:
    return f"+{(new / old - 1) * 100:.0f}%" if old > 0 else f"{new:.3g} ms"


def check_outputs(outputs: Mapping[str, np.ndarray], expected: Sequence[TensorSpec]) -> None:
    """The smoke inference's outputs are the signature's: same names, dtypes and shapes (the smoke policy's check)."""
    try:
        smoke_policy.check_outputs(outputs, expected)
    except InvalidInputError as err:
        raise HealthGateError(str(err)) from err


def inference_errors(metrics: str, name: str) -> float:
    """Failed inference requests of model `name` so far, from a device's Prometheus metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        if family.name == ERRORS_METRIC:
            for sample in family.samples:
                if sample.name == ERRORS_METRIC + "_total" and sample.labels.get("model") == name:
                    return sample.value
    return 0.0


def _watch(client: Any, device: Device, name: str, baseline: float, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(WATCH_INTERVAL, remaining))  # a counter on another machine: there is nothing to wait on
        try:
            errors = inference_errors(client.metrics(), name)
        except ArachneError as err:
            raise HealthGateError(f"{device} stopped answering while its errors were watched: {err}") from err
        if errors > baseline:
            raise HealthGateError(
                f"{errors - baseline:g} inference requests of {name!r} failed on {device} in the "
                f"{seconds - max(0.0, deadline - time.monotonic()):.1f} s after the switch (gate_seconds={seconds:g})"
            )


def _specs(metadata: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    """TensorSpecs of a device's V2 tensor metadata."""
    return [TensorSpec.create(m["name"], from_datatype(m["datatype"]), m["shape"]) for m in metadata]
