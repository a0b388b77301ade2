"""Prometheus metrics of one server instance, in a registry of its own (not the process-global one).

Inference counts and latency are plain numbers per model, changed only on the event loop thread
and turned into Prometheus series when scraped (a custom collector): a request costs a few
additions instead of prometheus_client's lock and method calls per value, which cost as much
as a tiny model's inference (docs/performance.md).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

_LATENCY_HELP = "Inference request latency on the server (decode, run, encode)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ModelSeries:
    """One model's inference requests, errors and latency; also the recent average the dataplane
    uses to run fast models inline. Changed on the event loop thread only, so no lock."""

    __slots__ = ("requests", "errors", "latency_sum", "latency_counts", "recent_seconds", "created")

    def __init__(self) -> None:
        self.requests = self.errors = 0
        self.latency_sum = 0.0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.recent_seconds = math.inf  # moving average of successful requests; none yet
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        """A request answered in `seconds`."""
        self.requests += 1
        self.latency_sum += seconds
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        recent = self.recent_seconds
        self.recent_seconds = seconds if recent == math.inf else 0.8 * recent + 0.2 * seconds

    def failed(self) -> None:
        self.requests += 1
        self.errors += 1


class Metrics:
    """Inference requests, errors and latency per model; load time per model; HTTP errors by status."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.models: dict[str, ModelSeries] = {}
        self.registry.register(_InferenceCollector(self.models))
        self.load_seconds = Gauge(
            "arachne_model_load_seconds", "Seconds the last load of each model took", ["model"], registry=self.registry
        )
        self.http_errors = Counter(
            "arachne_http_errors", "Error responses by HTTP status", ["status"], registry=self.registry
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
    failed, quarantined at start-up); read from the store when scraped, so deleted models vanish."""

    def __init__(self, store: object):
        self._store = store

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "arachne_model_ready", "Whether each stored model is loaded (1) or unavailable (0)", labels=["model"]
        )
        for entry in self._store.index():
            ready.add_metric([entry["name"]], 1.0 if entry["state"] == "READY" else 0.0)
        yield ready
