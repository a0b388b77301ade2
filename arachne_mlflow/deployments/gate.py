"""The health gate: a device that has switched to a new version counts as deployed only once it serves it.

Right after an upload the plugin asks the device, within `gate_timeout` seconds: is the model
ready, and does a smoke inference answer without error, with the outputs the model's signature
names, of its dtypes and shapes (-1 matches any)? Its inputs and checks are the one smoke policy
(model/smoke_policy.py) that a pulling device's smoke test uses too: the model's saved input
example when it fits, else generated inputs of the signature's specs. With `gate_seconds`, the device's error
counter for the model (`arachne_inference_errors_total` on its /metrics) is watched that long
after the switch: errors rising fail the gate, so a model that answers the smoke test but fails
the clients' requests is caught too.
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
