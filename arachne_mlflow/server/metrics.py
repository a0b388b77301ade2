"""Prometheus metrics of one server instance, in a registry of its own (not the process-global one),
and Triton's per-model inference statistics (the `statistics` extension) beside them.

Inference counts and latency are plain numbers per model, changed only on the event loop thread
and turned into Prometheus series when scraped (a custom collector): a request costs a few
additions instead of prometheus_client's lock and method calls per value, which cost as much
as a tiny model's inference (docs/performance.md).
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

_LATENCY_HELP = "Inference request latency on the server (decode, run, encode)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestTimes:
    """Where one inference request spent its time, in nanoseconds (`time.perf_counter_ns`), filled in
    by whoever runs it (the dataplane, or the dynamic batcher for the requests it merges).

    Triton's meanings: `queue` waiting for a thread or a batch, `compute_input` decoding the
    tensors, `compute_infer` the model, `compute_output` encoding the answer; `samples` is what the
    request adds to `inference_count` (its batch size where the model batches, else 1).
    """

    __slots__ = ("arrived", "queue", "compute_input", "compute_infer", "compute_output", "samples")

    def __init__(self, arrived: int) -> None:
        self.arrived = arrived
        self.queue = self.compute_input = self.compute_infer = self.compute_output = 0
        self.samples = 1


class ModelSeries:
    """One model's inference requests, errors and latency; also the recent average the dataplane
    uses to run fast models inline, and Triton's statistics. Changed on the event loop thread
    only, so no lock."""

    __slots__ = ("requests", "errors", "latency_sum", "latency_counts", "recent_seconds", "created", "triton")

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.latency_sum = 0.0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.recent_seconds = math.inf  # moving average of successful requests; none yet
        self.created = time.time()
        self.triton = InferenceStatistics()

    def succeeded(self, times: RequestTimes, executed: bool = True) -> None:
        """A request answered now; `executed`: it ran the model alone (one execution of its own
        batch), as opposed to within a batch the batcher records with `triton.executed`."""
        total = time.perf_counter_ns() - times.arrived
        seconds = total * 1e-9
        self.requests += 1
        self.latency_sum += seconds
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        recent = self.recent_seconds
        self.recent_seconds = seconds if recent == math.inf else 0.8 * recent + 0.2 * seconds
        self.triton.succeeded(times, total)
        if executed:
            self.triton.executed(times.samples, times.compute_input, times.compute_infer, times.compute_output)

    def failed(self, times: RequestTimes) -> None:
        self.requests += 1
        self.errors += 1
        self.triton.failed(time.perf_counter_ns() - times.arrived)


class InferenceStatistics:
    """Triton's statistics of one model, as plain sums (a request costs a few additions).

    As Triton counts them: `inference_count` adds each successful request's samples,
    `execution_count` the model's executions (a merged batch is one); queue and compute
    nanoseconds are summed per successful request (their counts are the success count), and per
    execution by batch size in `batches`.
    """

    __slots__ = (
        "inference_count",
        "execution_count",
        "last_inference_ns",
        "success_count",
        "success_ns",
        "fail_count",
        "fail_ns",
        "queue_ns",
        "input_ns",
        "infer_ns",
        "output_ns",
        "batches",
    )

    def __init__(self) -> None:
        self.inference_count = self.execution_count = self.last_inference_ns = 0
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, input ns, infer ns, output ns]

    def succeeded(self, times: RequestTimes, total_ns: int) -> None:
        self.inference_count += times.samples
        self.success_count += 1
        self.success_ns += total_ns
        self.queue_ns += times.queue
        self.input_ns += times.compute_input
        self.infer_ns += times.compute_infer
        self.output_ns += times.compute_output
        self.last_inference_ns = time.time_ns()

    def failed(self, total_ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += total_ns

    def executed(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of the model on a batch of `batch_size` samples."""
        self.execution_count += 1
        batch = self.batches.get(batch_size)
        if batch is None:
            batch = self.batches[batch_size] = [0, 0, 0, 0]
        batch[0] += 1
        batch[1] += input_ns
        batch[2] += infer_ns
        batch[3] += output_ns

    def to_dict(self, name: str, version: str) -> dict:
        """Triton's `ModelStatistics` JSON (numbers as numbers, the version as a string)."""
        successes = self.success_count

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        batch_stats = [
            {
                "batch_size": size,
                "compute_input": duration(count, input_ns),
                "compute_infer": duration(count, infer_ns),
                "compute_output": duration(count, output_ns),
            }
            for size, (count, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
        ]
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ns // 1_000_000,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(successes, self.success_ns),
                "fail": duration(self.fail_count, self.fail_ns),
                "queue": duration(successes, self.queue_ns),
                "compute_input": duration(successes, self.input_ns),
                "compute_infer": duration(successes, self.infer_ns),
                "compute_output": duration(successes, self.output_ns),
                "cache_hit": duration(0, 0),
                "cache_miss": duration(0, 0),
            },
            "batch_stats": batch_stats,
            "memory_usage": [],
            "response_stats": {},
        }


class Metrics:
    """Inference requests, errors and latency per model; load time per model; HTTP errors by status;
    the registry checks of followed models."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.models: dict[str, ModelSeries] = {}
        self.registry.register(_InferenceCollector(self.models))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes: a profile's memory figures
        self.load_seconds = Gauge(
            "arachne_model_load_seconds", "Seconds the last load of each model took", ["model"], registry=self.registry
        )
        self.http_errors = Counter(
            "arachne_http_errors", "Error responses by HTTP status", ["status"], registry=self.registry
        )
        self.grpc_errors = Counter(
            "arachne_grpc_errors",
            "Error responses of the gRPC service by status code",
            ["code"],
            registry=self.registry,
        )
        # pull mode (serve --follow)
        self.follow_last_success = Gauge(
            "arachne_follow_last_success_timestamp_seconds",
            "When each followed model last checked the registry successfully (Unix time)",
            ["model"],
            registry=self.registry,
        )
        self.follow_failures = Counter(
            "arachne_follow_failures",
            "Failures of each followed model: check (registry), download (resumed later), version (refused)",
            ["model", "stage"],
            registry=self.registry,
        )
        self.follow_updates = Counter(
            "arachne_follow_updates", "Versions installed by following the registry", ["model"], registry=self.registry
        )

    def forget(self, name: str) -> None:
        """Drop every series of model `name` (deleted: its name may never come back)."""
        self.models.pop(name, None)
        self.load_seconds.remove(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InferenceCollector:
    """The `ModelSeries` as Prometheus counters and a histogram, read when scraped."""

    def __init__(self, models: dict[str, ModelSeries]):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("arachne_inference_requests", "Inference requests per model", labels=["model"])
        errors = CounterMetricFamily(
            "arachne_inference_errors", "Inference requests that failed, per model", labels=["model"]
        )
        latency = HistogramMetricFamily("arachne_inference_latency_seconds", _LATENCY_HELP, labels=["model"])
        # (prometheus_client's own Histogram writes this series too)
        latency_created = GaugeMetricFamily(
            "arachne_inference_latency_seconds_created", _LATENCY_HELP, labels=["model"]
        )
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for name, series in list(self._models.items()):
            requests.add_metric([name], series.requests, created=series.created)
            errors.add_metric([name], series.errors, created=series.created)
            cumulative = itertools.accumulate(series.latency_counts)
            latency.add_metric([name], list(zip(bounds, cumulative)), sum_value=series.latency_sum)
            latency_created.add_metric([name], series.created)
        yield from (requests, errors, latency, latency_created)


class StoreCollector:
    """`arachne_model_ready`: 1 for each stored model that is loaded, 0 for one that is not (unloaded,
    failed, quarantined at start-up); read from the store when scraped, so deleted models vanish.
    `arachne_model_refusals`: versions refused for their signature (server/signatures.py)."""

    def __init__(self, store: object):
        self._store = store

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "arachne_model_ready", "Whether each stored model is loaded (1) or unavailable (0)", labels=["model"]
        )
        for entry in self._store.index():
            ready.add_metric([entry["name"]], 1.0 if entry["state"] == "READY" else 0.0)
        yield ready
        refusals = CounterMetricFamily(
            "arachne_model_refusals",
            "Versions refused for their signature (serve --trust-key), per model and reason: untrusted, tampered, "
            "downgrade",
            labels=["model", "reason"],
        )
        for (model, reason), count in sorted(self._store.signatures.counts.items()):
            refusals.add_metric([model, reason], count)
        yield refusals


class CaptureCounts:
    """Field capture per model (server/capture/): samples written, dropped (by reason: `cap`, a cap of
    the rules was spent; `queue_full`, the writer was behind; `budget`, deleted or refused to keep the
    spool within its disk budget; `error`, not written; `shadow_busy`, over the shadow runs allowed a
    second; `shadow_error`, the shadow model could not run) and uploaded (counted by whoever delivers them).
    Changed from several threads, under a lock: only kept or dropped samples pay for it."""

    DROP_REASONS = ("cap", "queue_full", "budget", "error", "shadow_busy", "shadow_error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.captured: dict[str, int] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self.uploaded: dict[str, int] = {}

    def add_captured(self, model: str, count: int = 1) -> None:
        with self._lock:
            self.captured[model] = self.captured.get(model, 0) + count

    def add_dropped(self, model: str, reason: str, count: int = 1) -> None:
        with self._lock:
            self.dropped[(model, reason)] = self.dropped.get((model, reason), 0) + count

    def add_uploaded(self, model: str, count: int = 1) -> None:
        with self._lock:
            self.uploaded[model] = self.uploaded.get(model, 0) + count

    def collect(self) -> Iterator[Metric]:
        captured = CounterMetricFamily(
            "arachne_capture_captured", "Field samples written to the spool", labels=["model"]
        )
        dropped = CounterMetricFamily(
            "arachne_capture_dropped",
            "Field samples dropped, per model and reason: cap, queue_full, budget, error, shadow_busy, shadow_error",
            labels=["model", "reason"],
        )
        uploaded = CounterMetricFamily("arachne_capture_uploaded", "Field samples delivered", labels=["model"])
        with self._lock:
            for model, count in sorted(self.captured.items()):
                captured.add_metric([model], count)
            for (model, reason), count in sorted(self.dropped.items()):
                dropped.add_metric([model, reason], count)
            for model, count in sorted(self.uploaded.items()):
                uploaded.add_metric([model], count)
        yield from (captured, dropped, uploaded)
