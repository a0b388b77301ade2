"""The health gate: a device that has switched to a new version counts as deployed only once it serves it.

Right after an upload the plugin asks the device, within `gate_timeout` seconds: is the model
ready, and does a smoke inference answer without error, with the outputs the model's signature
names, of its dtypes and shapes (-1 matches any)? The smoke inference sends the model's own input
example (MLflow's saved `input_example`), or random inputs of the signature's specs when it has
none (zeros for integers, which are often indices). With `gate_seconds`, the device's error
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
from arachne_mlflow.model.directory import ArachneModel
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.protocol.datatypes import from_datatype, to_datatype

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
    example = _saved_example(model)
    if example is None:
        return Smoke({spec.name: _random(spec) for spec in model.inputs}, model.outputs)
    from arachne_mlflow.deployments.inputs import to_arrays

    specs = [{"name": s.name, "datatype": to_datatype(s.dtype), "shape": list(s.shape)} for s in model.inputs]
    return Smoke(to_arrays(example, specs), model.outputs)


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
                inputs = {spec.name: _random(spec) for spec in _specs(metadata["inputs"])}
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
    """The smoke inference's outputs are the signature's: same names, dtypes and shapes."""
    names = [spec.name for spec in expected]
    if sorted(outputs) != sorted(names):
        raise HealthGateError(f"the smoke inference answered outputs {sorted(outputs)}; the signature has {names}")
    for spec in expected:
        try:
            spec.check(outputs[spec.name], "output")
        except InvalidInputError as err:
            raise HealthGateError(f"the smoke inference broke the signature: {err}") from err


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


def _saved_example(model: ArachneModel) -> Any:
    """MLflow's saved input example of `model` (named arrays for a tensor signature), or None."""
    if not model.mlmodel.get("saved_input_example_info"):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        return Model.load(str(model.path)).load_input_example(str(model.path))
    except (MlflowException, OSError, ValueError, KeyError) as err:
        raise InvalidInputError(
            f"the input example saved with the model at {model.path} cannot be read ({err}): the health gate "
            "needs it; log the model again with a valid input_example"
        ) from err


def _specs(metadata: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    """TensorSpecs of a device's V2 tensor metadata."""
    return [TensorSpec.create(m["name"], from_datatype(m["datatype"]), m["shape"]) for m in metadata]


def _random(spec: TensorSpec) -> np.ndarray:
    """Random numbers (floats, bools) for `spec`; zeros for integers, which are often indices (zero
    is valid for any table) and empty strings for strings."""
    from arachne_mlflow.runtime.base import random_tensor

    if spec.dtype.kind == "O":
        return np.full(spec.example_shape(), b"", dtype=object)
    if spec.dtype.kind in "iu":
        return np.zeros(spec.example_shape(), spec.dtype)
    return random_tensor(spec)
