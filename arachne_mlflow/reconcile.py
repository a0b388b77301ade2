"""One reconcile loop for every reconciler: a pass says how it went, the loop sleeps, jitters and backs off.

A pass (the follower's check, one `fleet sync`) returns an `Outcome`: done (next pass after the
interval), failed for a reason that may pass (the delay doubles per such failure in a row, capped),
or with a delay of its own. It raises `PermanentError` when trying again cannot help: the loop ends.
Any other exception is treated as transient: the caller's `on_error` reports it, the loop backs off.
Imports nothing but the standard library, so the device server and the deployments plugin share it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class PermanentError(Exception):
    """Raised by a pass when trying again cannot help: the loop ends and re-raises it."""


@dataclass(frozen=True)
class Outcome:
    """What one pass did: `transient` (it failed for a reason that may pass: back off) and, if it
    knows better than the schedule, the `delay` in seconds before the next pass."""

    transient: bool = False
    delay: float | None = None


DONE = Outcome()
RETRY = Outcome(transient=True)


@dataclass(frozen=True)
class Schedule:
    """When the next pass runs: `interval` seconds, doubled per transient failure in a row up to
    `backoff_cap` intervals and `max_backoff` seconds, times a random factor in [1 - jitter, 1]
    (devices that start together do not all ask at once). `from_start`: the interval is a period,
    counted from the start of the pass rather than its end."""

    interval: float
    jitter: float = 0.0
    backoff_cap: float = 1.0
    max_backoff: float = math.inf
    from_start: bool = False

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"a reconcile interval must be positive, not {self.interval}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter is a fraction of the delay in [0, 1], not {self.jitter}")
        if not self.backoff_cap >= 1.0:
            raise ValueError(f"backoff_cap is a number of intervals >= 1, not {self.backoff_cap}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to the next pass after `failures` transient failures in a row (0: the last pass was fine)."""
        base = self.interval
        if failures:
            base = min(self.interval * 2.0 ** (failures - 1), self.interval * self.backoff_cap, self.max_backoff)
        if self.jitter:
            base *= (rng or random).uniform(1.0 - self.jitter, 1.0)
        return base


def run(
    reconcile: Callable[[], Outcome],
    schedule: Schedule,
    stop: threading.Event,
    *,
    on_error: Callable[[Exception, float], None],
    on_wait: Callable[[float], None] | None = None,
    rng: random.Random | None = None,
) -> None:
    """Run `reconcile` until `stop` is set (it also cuts a wait short) or a pass raises `PermanentError`.

    `on_error(err, delay)` reports an unexpected exception of a pass (then treated as transient);
    `on_wait(delay)` is told each delay before the wait."""
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            outcome = reconcile()
        except PermanentError:
            raise
        except Exception as err:  # noqa: BLE001  (an outage or a bug must not end the loop: reported, retried)
            failures += 1
            delay = _wait(schedule, failures, started, rng)
            on_error(err, delay)
        else:
            failures = failures + 1 if outcome.transient else 0
            delay = outcome.delay if outcome.delay is not None else _wait(schedule, failures, started, rng)
        if on_wait is not None:
            on_wait(delay)
        stop.wait(delay)


def _wait(schedule: Schedule, failures: int, started: float, rng: random.Random | None) -> float:
    delay = schedule.delay(failures, rng)
    if schedule.from_start:
        delay = max(0.0, delay - (time.monotonic() - started))
    return delay
