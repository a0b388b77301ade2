"""Dynamic batching: concurrent infer requests of one model merged along dim 0, run once, split back.

The settings mean what they mean in Triton's dynamic batcher: `max_batch_size` (rows of one
merged run, and of one request), `preferred_batch_size` (sizes run as soon as they can be formed),
and `max_queue_delay_microseconds` (how long the oldest waiting request may be held for others to
join). A dynamic first dimension is not proof of a batch (a sequence model mixes its rows), so a
model batches only when its MLmodel declares that its first dimension is a batch (the
`arachne.batching` block, as Triton's per-model `max_batch_size`) or the server's `--batching`
names it; a server-wide `--batching` applies to declaring models only, and says which it skipped.

A request with more rows than `max_batch_size` is refused (400, Triton's wording); a request joins
only requests of its own kind (every input's dtype and non-batch dimensions equal); one that
cannot share a batch (no rows, inputs of unequal leading sizes) runs alone. Batches of a model run
one after the other: while one runs, the next fills. A merged run that fails is retried request
by request, so one request's failure is never another's.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.batching import BatchingSettings, batchable
from arachne_mlflow.model.spec import TensorSpec

_logger = logging.getLogger(__name__)

SIZE_BUCKETS = tuple(2**i for i in range(13))  # 1 ... MAX_BATCH_SIZE
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class BatchingPolicy:
    """Which models batch, and how: the server's `--batching` flags over each model's own declaration.

    A flag naming a model overrides its MLmodel (`None`: never batch it). The server-wide flag
    applies only to models whose MLmodel declares a batch and leaves the batcher to the server
    (`dynamic_batching: false`), capped by their `max_batch_size`; the models it skips are in
    `skipped`, with why.
    """

    def __init__(
        self, default: BatchingSettings | None = None, per_model: Mapping[str, BatchingSettings | None] | None = None
    ):
        self.default = default
        self.per_model = dict(per_model or {})
        self.skipped: dict[str, str] = {}

    @classmethod
    def from_flags(cls, flags: Sequence[str]) -> BatchingPolicy:
        """From `--batching` values: `MODEL=max_batch_size[,delay_us]`, `MODEL=off`, or a default without `MODEL=`."""
        default, per_model = None, {}
        for flag in flags:
            name, sep, value = flag.rpartition("=")
            if not sep:
                default = BatchingSettings.from_flag(value)
            elif not name:
                raise InvalidInputError(f"--batching {flag!r}: the model name before '=' is empty")
            else:
                per_model[name] = None if value.strip() == "off" else BatchingSettings.from_flag(value)
        return cls(default, per_model)

    def settings_for(
        self, name: str, config: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> BatchingSettings | None:
        """The settings model `name` runs with; `config` is its MLmodel `arachne.batching` (None: absent).

        A model that declares a batch in its MLmodel but cannot batch is refused (its author made
        a mistake); a flag is not applied to a model that cannot batch.
        """
        self.skipped.pop(name, None)
        can_batch = batchable(inputs, outputs)
        if name in self.per_model:
            settings = self.per_model[name]
            if settings is not None and not can_batch:
                _logger.warning("--batching %s: the model's leading dimensions are not dynamic; not batching", name)
                return None
            return settings
        if config is not None:
            settings = BatchingSettings.from_config(config, "arachne.batching")
            if not can_batch:
                shapes = {spec.name: list(spec.shape) for spec in (*inputs, *outputs)}
                raise InvalidInputError(
                    f"model {name!r} declares a batch (arachne.batching), but batching needs a dynamic leading "
                    f"dimension (-1) on every input and output; its tensors are {shapes}"
                )
            if config.get("dynamic_batching", True):
                return settings
            return None if self.default is None else self.default.capped(settings.max_batch_size)
        if self.default is not None:
            self._skip(name)
        return None

    def _skip(self, name: str) -> None:
        """The server-wide flag does not apply to model `name`: remember why, and say so."""
        reason = (
            "its MLmodel declares no batch dimension (arachne.batching); a dynamic first dimension is not "
            "proof of a batch"
        )
        self.skipped[name] = reason
        _logger.warning(
            "model %r: --batching %s does not apply: %s; name it (--batching %s=MAX_BATCH_SIZE[,DELAY_US]) to batch it",
            name,
            self.default.to_flag(),  # type: ignore[union-attr]
            reason,
            name,
        )


class BatchStats:
    """One model's executed batches (a histogram of their sizes) and the time requests waited to join one."""

    __slots__ = ("rows", "size_counts", "queue_sum", "queue_counts", "created")

    def __init__(self) -> None:
        self.rows = 0
        self.size_counts = [0] * (len(SIZE_BUCKETS) + 1)
        self.queue_sum = 0.0
        self.queue_counts = [0] * (len(QUEUE_BUCKETS) + 1)
        self.created = time.time()

    def batch(self, rows: int, waits: Sequence[float]) -> None:
        """A batch of `rows` ran; its requests had waited `waits` seconds."""
        self.rows += rows
        self.size_counts[bisect.bisect_left(SIZE_BUCKETS, rows)] += 1
        for seconds in waits:
            self.queue_sum += seconds
            self.queue_counts[bisect.bisect_left(QUEUE_BUCKETS, seconds)] += 1


class _Item:
    """One request in the queue; `times` (a `metrics.RequestTimes`, or None) gets its queue and run times."""

    __slots__ = ("inputs", "rows", "key", "future", "arrived", "times")

    def __init__(
        self, inputs: list[np.ndarray], rows: int, key: Any, future: asyncio.Future, arrived: float, times: Any
    ):
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.future = future
        self.arrived = arrived
        self.times = times


class Batcher:
    """The queue of one loaded model: `submit` from the event loop, answered once its batch has run.

    `run(inputs)` runs the model on checked inputs (the dataplane's way to leave the event loop);
    `executed(rows, nanoseconds)`, when given, hears of each run that succeeded (Triton's statistics).
    """

    def __init__(
        self,
        settings: BatchingSettings,
        run: Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]],
        stats: BatchStats | None = None,
        executed: Callable[[int, int], None] | None = None,
        name: str = "model",
    ):
        self.name = name
        self.settings = settings
        self.stats = stats if stats is not None else BatchStats()
        self._run = run
        self._executed = executed
        self._delay = settings.max_queue_delay_microseconds / 1e6
        self._queue: collections.deque[_Item] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, inputs: list[np.ndarray], times: Any = None) -> list[np.ndarray]:
        """The model's outputs for `inputs` (checked arrays, one per model input), as if run alone;
        `times` (a `metrics.RequestTimes`) gets the request's `queue` and `compute_infer`.
        More rows than `max_batch_size` are refused, as Triton refuses them (and in its words)."""
        loop = asyncio.get_running_loop()
        rows = inputs[0].shape[0]
        if rows > self.settings.max_batch_size:
            raise InvalidInputError(
                f"inference request batch-size must be <= {self.settings.max_batch_size} for '{self.name}'"
            )
        if rows == 0 or any(a.shape[0] != rows for a in inputs):
            key: Any = object()  # joins no other request
        else:
            key = tuple([(a.dtype, a.shape[1:]) for a in inputs])
        item = _Item(inputs, rows, key, loop.create_future(), time.perf_counter(), times)
        self._queue.append(item)
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._drain())
        else:
            self._arrived.set()  # type: ignore[union-attr]
        return await item.future

    async def _drain(self) -> None:
        """Run batches until the queue is empty (the worker exists only while there is work)."""
        try:
            while self._queue:
                batch = await self._next_batch()
                await self._execute(batch)
        finally:
            self._worker = None
            for item in self._queue:  # only when cancelled (the server stopping)
                if not item.future.done():
                    item.future.cancel()

    async def _next_batch(self) -> list[_Item]:
        """The batch to run next: full or preferred at once, else whatever joined when the oldest's delay ends."""
        settings = self.settings
        while True:
            batch, rows, preferred = self._candidates()
            if type(batch[0].key) is not tuple:  # joins no one: nothing to wait for
                return batch
            if rows >= settings.max_batch_size or preferred:
                return batch[:preferred] if preferred and rows < settings.max_batch_size else batch
            wait = self._queue[0].arrived + self._delay - time.perf_counter()
            if wait <= 0:
                return batch
            self._arrived.clear()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                pass

    def _candidates(self) -> tuple[list[_Item], int, int]:
        """The oldest request and the later ones of its kind that fit beside it, their rows, and
        how many of them make the largest preferred size (0: none)."""
        head = self._queue[0]
        batch, rows, preferred = [head], head.rows, 0
        limit = self.settings.max_batch_size
        sizes = self.settings.preferred_batch_size
        if rows in sizes:
            preferred = 1
        if type(head.key) is tuple:
            for item in itertools.islice(self._queue, 1, None):
                if item.key == head.key and rows + item.rows <= limit:
                    batch.append(item)
                    rows += item.rows
                    if rows in sizes:
                        preferred = len(batch)
                    if rows == limit:
                        break
        return batch, rows, preferred

    async def _execute(self, batch: list[_Item]) -> None:
        for item in batch:
            self._queue.remove(item)
        started = time.perf_counter()
        rows = sum(item.rows for item in batch)
        waits = [started - item.arrived for item in batch]
        self.stats.batch(rows, waits)
        for item, wait in zip(batch, waits):
            if item.times is not None:
                item.times.queue = int(wait * 1e9)
        if len(batch) == 1:
            await self._run_alone(batch[0])
            return
        merged = [np.concatenate(parts) for parts in zip(*[item.inputs for item in batch])]
        try:
            outputs = await self._timed_run(merged, batch)
            answers = _split(outputs, [item.rows for item in batch])
        except Exception as err:  # noqa: BLE001 (each request is retried alone: its own answer or error)
            _logger.warning("a batch of %d requests failed (%s); running each alone", len(batch), err)
            for item in batch:
                await self._run_alone(item)
            return
        for item, answer in zip(batch, answers):
            if not item.future.done():  # (cancelled: the client went away)
                item.future.set_result(answer)

    async def _timed_run(self, inputs: list[np.ndarray], items: Sequence[_Item]) -> list[np.ndarray]:
        """`run(inputs)`, its duration given to each of `items` and to `executed`."""
        start = time.perf_counter_ns()
        outputs = await self._run(inputs)
        elapsed = time.perf_counter_ns() - start
        if self._executed is not None:
            self._executed(inputs[0].shape[0], elapsed)
        for item in items:
            if item.times is not None:
                item.times.compute_infer = elapsed
        return outputs

    async def _run_alone(self, item: _Item) -> None:
        try:
            outputs = await self._timed_run(item.inputs, (item,))
        except Exception as err:  # noqa: BLE001 (the request's own error, raised in its handler)
            if not item.future.done():
                item.future.set_exception(err)
            return
        if not item.future.done():
            item.future.set_result(outputs)


def _split(outputs: Sequence[np.ndarray], rows: Sequence[int]) -> list[list[np.ndarray]]:
    """Each request's rows of every output (views, no copy)."""
    total = sum(rows)
    for output in outputs:
        if output.ndim == 0 or output.shape[0] != total:
            raise InvalidInputError(f"an output of shape {list(output.shape)} cannot be split into {total} rows")
    bounds = list(itertools.accumulate(rows, initial=0))
    return [[output[start:stop] for output in outputs] for start, stop in zip(bounds, bounds[1:])]


class BatchingCollector:
    """Every model's `BatchStats` as Prometheus histograms, read when scraped."""

    def __init__(self, stats: Mapping[str, BatchStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        sizes = HistogramMetricFamily("arachne_batch_size", "Rows of each batched run of the model", labels=["model"])
        queue = HistogramMetricFamily(
            "arachne_batch_queue_seconds", "Time a request waited in the model's batch queue", labels=["model"]
        )
        for name, stats in list(self._stats.items()):
            sizes.add_metric([name], _buckets(SIZE_BUCKETS, stats.size_counts), sum_value=stats.rows)
            queue.add_metric([name], _buckets(QUEUE_BUCKETS, stats.queue_counts), sum_value=stats.queue_sum)
        yield from (sizes, queue)


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Cumulative (upper bound, count) pairs, the last one +Inf."""
    return list(zip([floatToGoString(b) for b in bounds] + ["+Inf"], itertools.accumulate(counts)))
