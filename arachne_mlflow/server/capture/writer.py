"""The capture writer: one background thread that encodes queued samples and appends them to spools.

The infer path only ever calls `SampleQueue.offer`, which takes a lock for a few list operations
and never waits: a full queue (by count or by bytes) refuses the sample and the caller counts it
dropped. The thread fsyncs each spool at most every `sync_seconds`, rolls a segment once it
reaches its size or age, and keeps each spool within its rules' disk budget by deleting its oldest
closed segments (their samples are counted dropped, reason `budget`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from arachne_mlflow.errors import ArachneError
from arachne_mlflow.model.capture_rules import CaptureRules
from arachne_mlflow.protocol.capture_format import Sample, encode_sample
from arachne_mlflow.server.capture.spool import Spool

_logger = logging.getLogger(__name__)

MAX_QUEUED = 256
MAX_QUEUED_BYTES = 64 * 1024 * 1024
SYNC_SECONDS = 1.0
ROLL_SECONDS = 300.0
MAX_SEGMENT_BYTES = 16 * 1024 * 1024
MIN_SEGMENT_BYTES = 64 * 1024


@dataclass(frozen=True)
class Pending:
    """A sample the infer path kept, not yet encoded: references to the request's own arrays."""

    sample: Sample
    rules: CaptureRules


class SampleQueue:
    """A queue bounded by count and bytes whose `offer` never blocks."""

    def __init__(self, max_items: int = MAX_QUEUED, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.deque[tuple[Pending, int]] = collections.deque()
        self._bytes = 0
        self._ready = threading.Condition(threading.Lock())

    def offer(self, item: Pending, size: int) -> bool:
        """Queue `item` (`size` bytes of tensors) unless that would pass a bound; never waits."""
        with self._ready:
            if len(self._items) >= self.max_items or self._bytes + size > self.max_bytes:
                return False
            self._items.append((item, size))
            self._bytes += size
            self._ready.notify()
        return True

    def take(self, timeout: float) -> Pending | None:
        """The oldest item, waiting at most `timeout` seconds for one (None: none came)."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            if not self._items:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            return item

    def __len__(self) -> int:
        return len(self._items)


def tensor_bytes(*groups: dict[str, np.ndarray]) -> int:
    """The bytes a sample's tensors hold (BYTES items counted as pointers: a bound, not a measure)."""
    return sum(array.nbytes for group in groups for array in group.values())


class CaptureWriter:
    """The thread that drains a `SampleQueue` into spools; `spool(model)` gives a model's spool,
    `counted(model, captured, dropped, reason)` reports what each write did."""

    def __init__(
        self,
        queue: SampleQueue,
        spool: Callable[[str], Spool],
        counted: Callable[[str, int, int, str], None],
        sync_seconds: float = SYNC_SECONDS,
        roll_seconds: float = ROLL_SECONDS,
    ) -> None:
        self.queue = queue
        self._spool = spool
        self._counted = counted
        self.sync_seconds = sync_seconds
        self.roll_seconds = roll_seconds
        self._stop = threading.Event()
        self._touched: dict[str, Spool] = {}
        self._thread = threading.Thread(target=self._run, name="arachne-capture-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, fsync, and stop."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            item = self.queue.take(self.sync_seconds)
            if item is not None:
                self._write(item)
            now = time.monotonic()
            if now - last_sync >= self.sync_seconds or item is None:
                self._maintain(now)
                last_sync = now
            if self._stop.is_set() and not len(self.queue):
                self._maintain(now)
                return

    def _write(self, item: Pending) -> None:
        model = item.sample.model
        try:
            record = encode_sample(item.sample)
            spool = self._touched.get(model) or self._spool(model)
            self._touched[model] = spool
            with spool.lock:
                dropped = _append(spool, record, item.rules.budget_bytes)
        except (ArachneError, OSError) as err:  # a sample that cannot be encoded or written is dropped, logged
            _logger.warning("capture of model %r: a sample was not written: %s", model, err)
            self._counted(model, 0, 1, "error")
            return
        if dropped is None:  # larger than the whole budget
            self._counted(model, 0, 1, "budget")
        else:
            self._counted(model, 1, dropped, "budget")

    def _maintain(self, now: float) -> None:
        """fsync what was written; roll segments older than `roll_seconds`."""
        for model, spool in list(self._touched.items()):
            try:
                with spool.lock:
                    spool.sync()
                    if spool.open_bytes and now - spool.opened_at >= self.roll_seconds:
                        spool.roll()
            except OSError as err:
                _logger.warning("capture of model %r: the spool could not be synced: %s", model, err)

    def forget(self, model: str) -> None:
        """Stop tracking a spool (its directory was removed)."""
        self._touched.pop(model, None)


def segment_limit(budget: int) -> int:
    """The size at which a segment rolls: a quarter of the budget within fixed bounds, and never over
    the budget, so that deleting closed segments can always keep it."""
    return min(budget, max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, budget // 4)))


def _append(spool: Spool, record: bytes, budget: int) -> int | None:
    """Append within `budget`: how many older samples it dropped, or None if this one alone is larger."""
    if len(record) > budget:
        return None
    if spool.open_bytes and spool.open_bytes + len(record) > segment_limit(budget):
        spool.roll()
    spool.append(record)
    dropped = 0
    while spool.total_bytes() > budget and spool.closed():
        dropped += spool.drop_oldest()
    return dropped
