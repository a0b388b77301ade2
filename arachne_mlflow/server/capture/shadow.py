"""Shadow-model disagreement: another served model runs on a candidate's inputs, after the answer, off the loop.

The infer path only calls `ShadowRunner.offer`: a per-model token bucket (`per_second` of the rules'
`shadow`) and a bounded queue's append, under a lock, never a wait; what it refuses is counted
dropped, reason `shadow_busy`. The runner's one thread takes the shadow model through the store's
`use` (a replace cannot free it mid-run), runs it on the same inputs, and hands the sample on only
where the answers disagree, with the shadow's outputs as `shadow.<output>` and meta `shadow_model`
and `shadow_revision`. A shadow model that is missing, or whose inputs or outputs do not match, is
counted (`shadow_error`) and logged once per served model and shadow, never raised.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.capture_rules import CaptureRules, ShadowRule
from arachne_mlflow.protocol.capture_format import Sample

_logger = logging.getLogger(__name__)

MAX_PENDING = 64
MAX_PENDING_BYTES = 64 * 1024 * 1024
SHADOW_PREFIX = "shadow."
BUSY, ERROR = "shadow_busy", "shadow_error"


@dataclass(frozen=True)
class Candidate:
    """A request that passed the rate, conditions and caps: its sample, whose outputs are the served
    answer to compare (kept whatever `keep_outputs` says until then), and the rules."""

    sample: Sample
    rules: CaptureRules


class ShadowRunner:
    """One thread that runs shadow models; `use(name)` holds a loaded model, `keep(candidate, sample)`
    takes a sample that disagreed, `dropped(model, reason)` counts one whose shadow failed."""

    def __init__(
        self,
        use: Callable[[str], AbstractContextManager[Any]],
        keep: Callable[[Candidate, Sample], None],
        dropped: Callable[[str, str], None],
        max_pending: int = MAX_PENDING,
        max_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self._use, self._keep, self._dropped = use, keep, dropped
        self.max_pending, self.max_bytes = max_pending, max_bytes
        self._bytes = 0
        self._ready = threading.Condition(threading.Lock())
        self._items: collections.deque[tuple[Candidate, int]] = collections.deque()
        self._buckets: dict[str, tuple[float, float]] = {}  # served model -> (tokens, when last filled)
        self._warned: set[tuple[str, str]] = set()
        self._running = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="arachne-capture-shadow", daemon=True)
        self._thread.start()

    def offer(self, candidate: Candidate, size: int) -> bool:
        """Queue `candidate` (`size` bytes of tensors) unless its model's shadow runs are spent for now
        or the queue is full (by count or bytes)."""
        rule = candidate.rules.shadow
        model, now = candidate.sample.model, time.monotonic()
        with self._ready:
            capacity = max(1.0, rule.per_second)
            tokens, filled = self._buckets.get(model, (capacity, now))
            tokens = min(capacity, tokens + (now - filled) * rule.per_second)
            if tokens < 1.0 or len(self._items) >= self.max_pending or self._bytes + size > self.max_bytes:
                self._buckets[model] = (tokens, now)
                return False
            self._buckets[model] = (tokens - 1.0, now)
            self._items.append((candidate, size))
            self._bytes += size
            self._ready.notify()
        return True

    def join(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds until every queued candidate has run; whether they have."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._items and not self._running, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop."""
        with self._ready:
            self._stop = True
            self._ready.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._items or self._stop)
                if not self._items:
                    return
                candidate, size = self._items.popleft()
                self._bytes -= size
                self._running += 1
            try:
                self._judge(candidate)
            finally:
                with self._ready:
                    self._running -= 1
                    self._ready.notify_all()

    def _judge(self, candidate: Candidate) -> None:
        rule = candidate.rules.shadow
        sample = candidate.sample
        try:
            with self._use(rule.model) as shadow:
                answers = dict(zip(shadow.output_names, shadow.module.infer(sample.inputs)))
                revision = shadow.revision
            compared = compared_outputs(rule, sample.outputs, answers)
        except Exception as err:  # noqa: BLE001 (whatever the shadow does, the served model's capture goes on)
            self._failed(sample.model, rule.model, err)
            return
        if agree(rule, sample.outputs, answers, compared):
            return
        shadow_outputs = {SHADOW_PREFIX + name: answers[name] for name in compared}
        outputs = {**(sample.outputs if candidate.rules.keep_outputs else {}), **shadow_outputs}
        meta = {**sample.meta, "shadow_model": rule.model, "shadow_revision": revision}
        self._keep(candidate, dataclasses.replace(sample, outputs=outputs, meta=meta))

    def _failed(self, model: str, shadow: str, err: Exception) -> None:
        self._dropped(model, ERROR)
        if (model, shadow) not in self._warned:
            self._warned.add((model, shadow))
            _logger.warning(
                "capture of model %r: its shadow model %r cannot run (counted shadow_error): %s", model, shadow, err
            )


def compared_outputs(rule: ShadowRule, answer: dict[str, np.ndarray], shadow: dict[str, np.ndarray]) -> list[str]:
    """The outputs compared: the rule's one, or every output of the served model; each must be in both."""
    names = [rule.output] if rule.output is not None else list(answer)
    missing = [name for name in names if name not in answer or name not in shadow]
    if missing:
        raise InvalidInputError(
            f"outputs {missing} are not answered by both models (served: {list(answer)}, shadow: {list(shadow)})"
        )
    return names


def agree(rule: ShadowRule, answer: dict[str, np.ndarray], shadow: dict[str, np.ndarray], names: list[str]) -> bool:
    """Whether the answers agree on every output named: the same shape and dtype, and numbers within
    `atol + rtol * |shadow|` (`np.allclose`, NaN equal to NaN), other data equal."""
    return all(_same(np.asarray(answer[name]), np.asarray(shadow[name]), rule) for name in names)


def _same(served: np.ndarray, shadow: np.ndarray, rule: ShadowRule) -> bool:
    if served.shape != shadow.shape or served.dtype != shadow.dtype:
        return False
    if served.dtype.kind in "fciu":
        return bool(np.allclose(served, shadow, rtol=rule.rtol, atol=rule.atol, equal_nan=True))
    return bool(np.array_equal(served, shadow))
