"""Prometheus metrics of one server instance, in a registry of its own (not the process-global one)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """Inference requests, errors and latency per model; load time per model; HTTP errors by status."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "arachne_inference_requests", "Inference requests per model", ["model"], registry=self.registry
        )
        self.errors = Counter(
            "arachne_inference_errors", "Inference requests that failed, per model", ["model"], registry=self.registry
        )
        self.latency = Histogram(
            "arachne_inference_latency_seconds", "Inference request latency (decode, run, encode)", ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.load_seconds = Gauge(
            "arachne_model_load_seconds", "Seconds the last load of each model took", ["model"], registry=self.registry
        )
        self.http_errors = Counter(
            "arachne_http_errors", "Error responses by HTTP status", ["status"], registry=self.registry
        )

        self._per_model: dict[str, tuple[Any, Any, Any]] = {}

    def model(self, name: str) -> tuple[Any, Any, Any]:
        """The (requests, errors, latency) series of model `name`, looked up once, not per request."""
        series = self._per_model.get(name)
        if series is None:
            series = self._per_model[name] = (
                self.requests.labels(name), self.errors.labels(name), self.latency.labels(name)
            )
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)
