"""`profile`: every variant of a model version measured on each kind of device of a target.

    result = profile_model("models:/detector/4", "arachne-jetson://@lyon", repeats=200)

For each kind of device (model/device_kind.py; one device per kind unless `every_device`), each
variant the device can run is measured (measure.py) and, unless `log=False`, recorded in MLflow
(runs.py). One device failing is that device's rows; the others go on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from arachne_mlflow.deployments.converge import on_devices
from arachne_mlflow.deployments.source import ModelSource, resolve
from arachne_mlflow.deployments.targets import Device, Settings, resolve_target, settings
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.model.device_kind import DeviceKind, device_kind
from arachne_mlflow.model.directory import ArachneModel
from arachne_mlflow.model.variants import unmet_requirements
from arachne_mlflow.profiling.measure import Measurement, Plan, measure
from arachne_mlflow.profiling.reference import Inputs, profile_inputs, reference_outputs

Progress = Callable[[str], None]


@dataclass
class Row:
    """One (device, variant): measured, skipped (the device cannot run it) or failed."""

    device: str
    kind: DeviceKind | None
    variant: str
    measurement: Measurement | None = None
    skipped: str | None = None
    run_id: str | None = None

    @property
    def error(self) -> str | None:
        return self.measurement.error if self.measurement else None


@dataclass
class ProfileResult:
    model_uri: str
    source: ModelSource
    plan: Plan
    inputs: Inputs
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if row.error or (row.kind is None)]


def profile_model(
    model_uri: str,
    target: str,
    *,
    config: Mapping[str, Any] | None = None,
    plan: Plan | None = None,
    every_device: bool = False,
    data: Any = None,
    targets: str | None = None,
    log: bool = True,
    progress: Progress | None = None,
) -> ProfileResult:
    """Measure each variant of `model_uri` on each kind of device of `target`. `data` (a DataFrame,
    an array or a dict of arrays) gives the inputs (a sample of `plan.sample_rows`), else the model's
    input example; with `targets` (a column of `data`), each measured variant is also evaluated on
    the device with `mlflow.models.evaluate` (a classifier), logged in its run."""
    plan = plan or Plan()
    chosen = settings(config)
    say = progress or (lambda message: None)
    devices = resolve_target(target, chosen.fleet)
    with tempfile.TemporaryDirectory(prefix="arachne-profile-") as scratch_dir:
        source = resolve(model_uri, scratch_dir)
        model = source.model
        inputs = profile_inputs(model, data, targets, plan.sample_rows)
        reference = reference_outputs(model.variants[0], inputs.arrays)
        result = ProfileResult(model_uri, source, plan, inputs)
        picked = _devices_by_kind(devices, chosen, every_device, say, result)
        recorder = _recorder(result, log)

        def on_device(pair):
            return _profile_device(pair, model, chosen, reference, result, recorder, say)

        for rows in on_devices(picked, on_device, chosen.parallel or 1):
            result.rows.extend(rows)
        if recorder is not None:
            result.summary = recorder.summarize(result.rows)
    return result


def _devices_by_kind(
    devices: list[Device], chosen: Settings, every_device: bool, say: Progress, result: ProfileResult
) -> list[tuple[Device, dict[str, Any], DeviceKind]]:
    """Each device with what it reports and its kind: the first of each kind, or all of them."""
    picked, kinds = [], set()
    for device in devices:
        try:
            with chosen.connection.probing().client(device) as client:
                metadata = client.server_metadata(timeout=chosen.connection.timeout)
        except ArachneError as err:
            say(f"{device}: unreachable ({err})")
            result.rows.append(Row(str(device), None, "-", Measurement("-", str(device), error=str(err))))
            continue
        kind = device_kind(metadata)
        if every_device or kind.key not in kinds:
            picked.append((device, metadata, kind))
            kinds.add(kind.key)
    return picked


def _profile_device(pair, model: ArachneModel, chosen: Settings, reference, result, recorder, say) -> list[Row]:
    device, metadata, kind = pair
    rows = []
    for variant in model.variants:
        unmet = unmet_requirements(variant, metadata)
        if unmet:
            say(f"{device} ({kind.key}): {variant.variant_name}: skipped, {'; '.join(unmet)}")
            rows.append(Row(str(device), kind, variant.variant_name, skipped="; ".join(unmet)))
            continue
        say(f"{device} ({kind.key}): {variant.variant_name}: measuring ...")
        row = Row(str(device), kind, variant.variant_name)
        row.run_id = recorder.open(row, metadata) if recorder else None
        evaluate = recorder.evaluator(row, device, chosen) if recorder and result.inputs.targets is not None else None
        row.measurement = measure(
            device, chosen.connection, variant, result.inputs.arrays, reference, result.plan, evaluate
        )
        if recorder:
            recorder.close(row, metadata)
        say(f"{device} ({kind.key}): {variant.variant_name}: {_said(row.measurement)}")
        rows.append(row)
    return rows


def _said(m: Measurement) -> str:
    if m.error:
        return f"failed: {m.error}"
    agree = "agrees" if m.agreement.get("within_tolerance") else "DISAGREES"
    return f"p50 {m.metrics.get('p50_ms', float('nan')):.3f} ms over {m.repeats_done} runs, {agree}"


def _recorder(result: ProfileResult, log: bool):
    if not log:
        return None
    from arachne_mlflow.profiling.runs import Recorder

    return Recorder(result)


def check_plan(repeats: int, warmup: int) -> None:
    """The device's benchmark route takes 1-10000 repeats and 0-1000 warm-up runs: said here first."""
    if not 1 <= repeats <= 10_000 or not 0 <= warmup <= 1000:
        raise InvalidInputError(f"repeats must be in [1, 10000] and warmup in [0, 1000], got {repeats}, {warmup}")


__all__ = ["Plan", "ProfileResult", "Row", "profile_model"]
