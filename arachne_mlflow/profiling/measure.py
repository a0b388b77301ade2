"""One variant of a model measured on one device, under a scratch name that is removed afterwards.

The device's own clock times the runs (its benchmark route), its `/metrics` gives its memory, and
its answers on the profile's inputs are compared with the reference variant's answers on the host.
Nothing the device serves is touched: the scratch name is new (checked), and it is deleted whether
the measurement succeeds or not.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arachne_mlflow.deployments.targets import Connection, Device
from arachne_mlflow.errors import ArachneError, ConflictError, InsufficientStorageError
from arachne_mlflow.flavors.agreement import DEFAULT_TOLERANCE, compare_outputs
from arachne_mlflow.model.archive import tar_size
from arachne_mlflow.model.directory import ArachneModel

SCRATCH_PREFIX = "arachne-profile-"
_RSS = re.compile(r"^process_resident_memory_bytes\s+(\S+)$", re.MULTILINE)
_MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How to measure: `repeats` timed runs after `warmup` untimed ones, in one benchmark call on the
    device; the largest upload a profile may leave on a device's disk."""

    repeats: int = 100
    warmup: int = 10
    max_bytes: int = 512 * _MB
    batch_rows: int = 64
    sample_rows: int = 256  # rows of a data set the answers are compared on (and evaluated on)


@dataclass
class Measurement:
    """What was measured for one (variant, device); `error` set when it could not be."""

    variant: str
    device: str
    metrics: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    repeats_done: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def measure(
    device: Device,
    connection: Connection,
    variant: ArachneModel,
    inputs: list[np.ndarray],
    reference: list[np.ndarray],
    plan: Plan,
    while_loaded: Callable[[str], dict[str, float]] | None = None,
) -> Measurement:
    """Upload `variant` under a scratch name, time it, compare its answers, delete it; a failure is
        the measurement's `error`, never an exception. `while_loaded(scratch_name)` runs last, before the
    delete (an evaluation on the device); the figures it returns join the metrics."""
    result = Measurement(variant.variant_name, str(device))
    files = sorted(set(variant.files()))
    size = tar_size(variant.path, files)
    if size > plan.max_bytes:
        bound = plan.max_bytes / _MB
        result.error = f"the variant is {size / _MB:.1f} MB, more than the profile's bound of {bound:.0f} MB"
        return result
    with connection.client(device) as client:
        scratch = _scratch_name(client)
        try:
            _run(client, scratch, variant, files, inputs, reference, plan, result)
            if while_loaded is not None:
                result.metrics.update(while_loaded(scratch))
        except InsufficientStorageError as err:
            result.error = f"no room on the device: {err}"
        except ArachneError as err:
            result.error = f"{type(err).__name__}: {err}"
        finally:
            _remove(client, scratch, result)
    return result


def _run(client, scratch, variant, files, inputs, reference, plan, result) -> None:
    rss_before = _rss(client)
    start = time.perf_counter()
    client.upload_model(scratch, variant.path, files=files, force=True)
    result.metrics["upload_ms"] = (time.perf_counter() - start) * 1000
    client.unload_model(scratch)
    start = time.perf_counter()
    client.load_model(scratch)
    result.metrics["load_ms"] = _load_seconds(client, scratch) * 1000 or (time.perf_counter() - start) * 1000
    rss_loaded = _rss(client)
    first = client.benchmark(scratch, warmup=0, repeat=1, number=1)
    result.metrics["first_inference_ms"] = float(first["max"])
    warm = client.benchmark(scratch, warmup=plan.warmup, repeat=plan.repeats, number=1)
    result.repeats_done = int(warm.get("repeat", plan.repeats))
    result.metrics.update({f"{key}_ms": float(warm[src]) for key, src in _LATENCY.items() if src in warm})
    outputs = _device_outputs(client, scratch, variant, inputs, plan.batch_rows)
    rss_after = _rss(client)
    record = client.model_record(scratch) or {}
    result.metrics["model_mb"] = float(record.get("bytes") or tar_size(variant.path, files)) / _MB
    if None not in (rss_before, rss_loaded, rss_after):
        result.metrics["memory_load_mb"] = (rss_loaded - rss_before) / _MB
        result.metrics["memory_growth_mb"] = (max(rss_loaded, rss_after) - rss_before) / _MB
    result.agreement = compare_outputs(reference, outputs, {**DEFAULT_TOLERANCE, **variant.tolerance})
    if "max_abs_diff" in result.agreement:
        result.metrics["max_abs_diff"] = result.agreement["max_abs_diff"]
    if "top1_agreement" in result.agreement:
        result.metrics["top1_agreement"] = result.agreement["top1_agreement"]
    result.metrics["within_tolerance"] = float(bool(result.agreement["within_tolerance"]))


_LATENCY = {"mean": "mean", "p50": "median", "p90": "p90", "p99": "p99"}


def _device_outputs(client, scratch, variant, inputs, batch_rows) -> list[np.ndarray]:
    """The device's answers on `inputs`, sent in requests of at most `batch_rows` rows (or the model's
    fixed batch size)."""
    names = [spec.name for spec in variant.inputs] or client.model_metadata(scratch)["inputs"]
    fixed = {int(spec.shape[0]) for spec in variant.inputs if spec.shape and int(spec.shape[0]) > 0}
    rows = fixed.pop() if len(fixed) == 1 else batch_rows
    count = len(inputs[0])
    parts: list[list[np.ndarray]] = []
    for start in range(0, count, rows):
        answer = client.infer(scratch, {n: x[start : start + rows] for n, x in zip(names, inputs)})
        parts.append([answer[spec.name] for spec in variant.outputs] if variant.outputs else list(answer.values()))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _scratch_name(client) -> str:
    """A name the device does not use (asked, not assumed)."""
    for _ in range(5):
        name = SCRATCH_PREFIX + secrets.token_hex(6)
        if client.model_record(name) is None:
            return name
    raise ConflictError("the device holds every scratch name tried; delete its arachne-profile-* models")


def _remove(client, scratch: str, result: Measurement) -> None:
    """Delete the scratch model (if the upload got that far); a failure to is the result's error too."""
    try:
        if client.model_record(scratch) is not None:
            client.delete_model(scratch)
    except ArachneError as err:
        note = f"scratch model {scratch!r} could not be deleted: {err}"
        result.error = f"{result.error}; {note}" if result.error else note


def _rss(client) -> float | None:
    """The device server's resident memory in bytes (None: its /metrics does not say)."""
    found = _RSS.search(client.metrics())
    return float(found.group(1)) if found else None


def _load_seconds(client, scratch: str) -> float:
    """The device's own timing of the last load of `scratch` (`arachne_model_load_seconds`), 0 if absent."""
    pattern = re.compile(r'^arachne_model_load_seconds\{model="' + re.escape(scratch) + r'"\}\s+(\S+)$', re.MULTILINE)
    found = pattern.search(client.metrics())
    return float(found.group(1)) if found else 0.0
