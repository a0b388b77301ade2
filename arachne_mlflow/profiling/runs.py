"""A profile in MLflow: one run per (model version, variant, device), a summary tag on the version.

Experiment `arachne-profile/<registered model>` (`arachne-profile/unregistered` for a model URI
outside the registry). Each run has params (device, kind, arch, runtime, its library and version,
providers, variant, repeats), metrics in ms and MB, and tags linking the model version. The model
version's tag `arachne.profile` maps each kind of device to its fastest variant within tolerance.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from arachne_mlflow.deployments.targets import Device, Settings
from arachne_mlflow.errors import ArachneError
from arachne_mlflow.protocol.bounded_json import loads

EXPERIMENT_PREFIX = "arachne-profile/"
SUMMARY_TAG = "arachne.profile"
TAG_PREFIX = "arachne.profile."
MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag's value
MAX_PARAM_CHARS = 500


def experiment_name(registered_model: str | None) -> str:
    return EXPERIMENT_PREFIX + (registered_model or "unregistered")


class Recorder:
    """Writes a profile's runs as they are measured, then the summary."""

    def __init__(self, result: Any):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.result = result
        self.registry = result.source.registry
        name = experiment_name(self.registry.registered_model if self.registry else None)
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(name)

    def open(self, row: Any, metadata: dict[str, Any]) -> str:
        """Start the row's run with its params and tags; its id."""
        tags = {
            "mlflow.runName": f"{row.variant} on {row.kind.key}",
            TAG_PREFIX + "model_uri": self.result.model_uri,
            TAG_PREFIX + "device_kind": row.kind.key,
            TAG_PREFIX + "device_kind_label": row.kind.label[:MAX_PARAM_CHARS],
        }
        if self.registry:
            tags[TAG_PREFIX + "registered_model"] = self.registry.registered_model
            tags[TAG_PREFIX + "model_version"] = self.registry.version
        run = self.client.create_run(self.experiment_id, tags=tags)
        for key, value in self._params(row, metadata).items():
            self.client.log_param(run.info.run_id, key, str(value)[:MAX_PARAM_CHARS])
        return run.info.run_id

    def close(self, row: Any, metadata: dict[str, Any]) -> None:
        """Log the row's metrics and end its run (FAILED, with the error as a tag, when it failed)."""
        measurement = row.measurement
        run_id = row.run_id
        for key, value in measurement.metrics.items():
            self.client.log_metric(run_id, key, float(value))
        self.client.log_param(run_id, "repeats_done", measurement.repeats_done)
        if measurement.agreement.get("summary"):
            self.client.set_tag(run_id, TAG_PREFIX + "agreement", measurement.agreement["summary"])
        if measurement.error:
            self.client.set_tag(run_id, TAG_PREFIX + "error", measurement.error[:MAX_TAG_CHARS])
        self.client.set_terminated(run_id, "FAILED" if measurement.error else "FINISHED")

    def evaluator(self, row: Any, device: Device, chosen: Settings):
        """While the scratch model is on the device: `mlflow.models.evaluate` on the device's own
        answers, logged in the row's run; its metrics are returned (and so joined to the row's)."""
        inputs = self.result.inputs

        def evaluate(scratch: str) -> dict[str, float]:
            import mlflow

            from arachne_mlflow.deployments.predictor import predictor_on

            predict = predictor_on(
                device, chosen.connection, scratch, classes=True, batch_rows=self.result.plan.batch_rows
            )
            try:
                with _in_experiment_of(row.run_id), mlflow.start_run(run_id=row.run_id):
                    outcome = mlflow.models.evaluate(
                        model=predict, data=inputs.data, targets=inputs.targets, model_type="classifier"
                    )
            except (mlflow.exceptions.MlflowException, ValueError, TypeError) as err:
                raise ArachneError(f"mlflow.models.evaluate failed on the device's answers: {err}") from err
            return {key: float(v) for key, v in outcome.metrics.items() if isinstance(v, (int, float))}

        return evaluate

    def summarize(self, rows: list[Any]) -> dict[str, Any]:
        """Per kind of device, the fastest variant within tolerance (median p50 over its devices);
        merged into the version's summary tag (kinds measured before keep theirs)."""
        summary = summary_of(rows)
        if self.registry is None or not summary:
            return summary
        version = self.client.get_model_version(self.registry.registered_model, self.registry.version)
        merged = _previous(version.tags.get(SUMMARY_TAG))
        merged.update(summary)
        text = json.dumps(merged, sort_keys=True)
        while len(text) > MAX_TAG_CHARS and len(merged) > 1:  # the oldest kinds go first
            oldest = min(merged, key=lambda k: merged[k].get("at", ""))
            merged.pop(oldest)
            text = json.dumps(merged, sort_keys=True)
        self.client.set_model_version_tag(self.registry.registered_model, self.registry.version, SUMMARY_TAG, text)
        return summary

    def _params(self, row: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        variant = self.result.source.model.variant(row.variant)
        runtime = next((r for r in metadata.get("runtimes") or [] if r.get("name") == variant.runtime), {})
        plan = self.result.plan
        params = {
            "device": row.device,
            "device_kind": row.kind.key,
            "arch": metadata.get("arch"),
            "variant": row.variant,
            "runtime": variant.runtime,
            "runtime_library": runtime.get("library"),
            "runtime_version": runtime.get("version"),
            "providers": ",".join(runtime.get("providers") or []) or None,
            "tvm_device": variant.tvm.get("device") if variant.runtime == "tvm" else None,
            "repeats": plan.repeats,
            "warmup": plan.warmup,
            "timing": "device clock, one benchmark call: warm-up runs, then each repeat timed alone",
            "inputs": self.result.inputs.source,
        }
        return {key: value for key, value in params.items() if value is not None}


def summary_of(rows: list[Any]) -> dict[str, Any]:
    """Per kind: `{"variant", "p50_ms", "label", "devices", "at"}` of the fastest agreeing variant, or
    `{"variant": None, "reason"}` when none measured agrees."""
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    by_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    labels, measured = {}, set()
    for row in rows:
        if row.kind is None or row.measurement is None:
            continue
        labels[row.kind.key] = row.kind.label
        m = row.measurement
        if m.ok:
            measured.add(row.kind.key)
        if m.ok and m.agreement.get("within_tolerance") and "p50_ms" in m.metrics:
            by_kind[row.kind.key][row.variant].append(m.metrics["p50_ms"])
    summary: dict[str, Any] = {}
    for key in measured:
        variants = {name: statistics.median(p50s) for name, p50s in by_kind.get(key, {}).items()}
        if not variants:
            summary[key] = {"variant": None, "reason": "no variant agreed with the reference", "at": at}
            continue
        best = min(variants, key=variants.get)
        summary[key] = {"variant": best, "p50_ms": round(variants[best], 4), "label": labels[key][:200], "at": at}
    return summary


def _previous(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = loads(text, f"tag {SUMMARY_TAG}", max_bytes=MAX_TAG_CHARS * 4)
    except ArachneError:
        return {}
    return {k: v for k, v in value.items() if isinstance(v, dict)} if isinstance(value, dict) else {}


@contextlib.contextmanager
def _in_experiment_of(run_id: str) -> Iterator[None]:
    """The run's experiment made the active one while MLflow's evaluator logs into the run, then the
    caller's back: `start_run(run_id=...)` refuses a run outside an experiment the caller set active.
    (MLflow has no public getter of the active experiment, hence its module attribute.)"""
    import mlflow
    from mlflow.tracking import fluent

    previous = fluent._active_experiment_id
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    try:
        yield
    finally:
        fluent._active_experiment_id = previous
