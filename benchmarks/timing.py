"""Interleaved A/B timing: every candidate is timed in each round, so machine noise hits all alike.

A round times `number` calls of each candidate back to back, rotating the order from one
round to the next so each candidate runs in each position equally often (a library's worker
threads still spinning from the call before slow whoever comes next); ratios are taken per round
(candidate / baseline) and summarized by their median, which is what the targets are stated in.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Series:
    """Per-call times of one candidate, one value per round, in seconds."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def summary(self) -> dict[str, float]:
        return {
            "median_ms": self.median * 1e3,
            "min_ms": min(self.times) * 1e3,
            "max_ms": max(self.times) * 1e3,
        }


def interleaved(
    candidates: dict[str, Callable[[], Any]], *, rounds: int, number: int, warmup: int = 3
) -> dict[str, Series]:
    """Time each candidate for `rounds` rounds of `number` calls; returns per-call times."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    series = {name: Series(name) for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                fn = candidates[name]
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                series[name].times.append((time.perf_counter() - start) / number)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return series


def compare(baseline: Series, candidate: Series) -> dict[str, float]:
    """Median of the per-round ratios and of the per-round differences (µs per call)."""
    ratios = [c / b for b, c in zip(baseline.times, candidate.times)]
    diffs = [(c - b) * 1e6 for b, c in zip(baseline.times, candidate.times)]
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "overhead_us_median": statistics.median(diffs),
    }


def row(
    suite: str,
    case: str,
    baseline: Series,
    candidate: Series,
    target: str | None = None,
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row for the report."""
    return {
        "suite": suite,
        "case": case,
        "baseline": baseline.name,
        "candidate": candidate.name,
        "baseline_ms": baseline.summary(),
        "candidate_ms": candidate.summary(),
        **compare(baseline, candidate),
        "target": target,
        "met": met,
        **extra,
    }
