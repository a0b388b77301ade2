"""A model's batching declaration (MLmodel's `arachne.batching`), read and bounded.

The keys mean what they mean in Triton's model configuration: `max_batch_size` declares that the
first dimension of every input and output is a batch of at most that many rows, and
`preferred_batch_size` and `max_queue_delay_microseconds` are its `dynamic_batching`.
`dynamic_batching: false` declares the batch but leaves the dynamic batcher to the device
server's `--batching` flag. Here (not in the server) so that the flavors check it at save time
without the server's packages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import TensorSpec

#: Bounds on settings read from an uploaded MLmodel or a flag.
MAX_BATCH_SIZE = 4096
MAX_QUEUE_DELAY_US = 10_000_000
MAX_PREFERRED_SIZES = 16
_KEYS = ("max_batch_size", "preferred_batch_size", "max_queue_delay_microseconds", "dynamic_batching")


@dataclass(frozen=True)
class BatchingSettings:
    """Triton's `max_batch_size` and `dynamic_batching` for one model."""

    max_batch_size: int
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0

    @classmethod
    def from_config(cls, config: Any, where: str = "batching") -> BatchingSettings:
        """Settings from a mapping (MLmodel's `arachne.batching`), every value checked."""
        if not isinstance(config, Mapping):
            raise InvalidInputError(f"{where} must be a mapping with keys {list(_KEYS)}")
        unknown = sorted(set(config) - set(_KEYS))
        if unknown:
            raise InvalidInputError(f"{where}: unknown keys {unknown}; known: {list(_KEYS)}")
        if "max_batch_size" not in config:
            raise InvalidInputError(f"{where} needs max_batch_size")
        size = _bounded_int(config["max_batch_size"], 1, MAX_BATCH_SIZE, f"{where}.max_batch_size")
        delay = _bounded_int(
            config.get("max_queue_delay_microseconds", 0),
            0,
            MAX_QUEUE_DELAY_US,
            f"{where}.max_queue_delay_microseconds",
        )
        preferred = config.get("preferred_batch_size") or []
        if isinstance(preferred, int):
            preferred = [preferred]
        if not isinstance(preferred, list) or len(preferred) > MAX_PREFERRED_SIZES:
            raise InvalidInputError(
                f"{where}.preferred_batch_size must be a list of at most {MAX_PREFERRED_SIZES} sizes"
            )
        sizes = sorted({_bounded_int(p, 1, size, f"{where}.preferred_batch_size") for p in preferred})
        if not isinstance(config.get("dynamic_batching", True), bool):
            raise InvalidInputError(f"{where}.dynamic_batching must be true or false")
        return cls(size, tuple(sizes), delay)

    def capped(self, max_batch_size: int) -> BatchingSettings:
        """These settings for a model that takes at most `max_batch_size` rows."""
        size = min(self.max_batch_size, max_batch_size)
        return BatchingSettings(
            size, tuple(p for p in self.preferred_batch_size if p <= size), self.max_queue_delay_microseconds
        )

    def to_flag(self) -> str:
        return f"{self.max_batch_size},{self.max_queue_delay_microseconds}"

    @classmethod
    def from_flag(cls, text: str) -> BatchingSettings:
        """`max_batch_size[,max_queue_delay_microseconds]`, as the `--batching` flag writes them."""
        parts = text.split(",")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidInputError(f"--batching {text!r}: expected max_batch_size[,max_queue_delay_microseconds]")
        values = dict(zip(("max_batch_size", "max_queue_delay_microseconds"), (int(p) for p in parts)))
        return cls.from_config(values, "--batching")

    def to_config(self) -> dict[str, Any]:
        """The settings as Triton's model configuration writes them."""
        return {
            "max_batch_size": self.max_batch_size,
            "dynamic_batching": {
                "preferred_batch_size": list(self.preferred_batch_size),
                "max_queue_delay_microseconds": self.max_queue_delay_microseconds,
            },
        }


def _bounded_int(value: Any, low: int, high: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInputError(f"{where} must be an integer in [{low}, {high}], got {value!r}")
    return value


def batchable(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    """Whether requests can be merged along dim 0: every tensor's leading dimension is dynamic."""
    return bool(inputs) and all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs))
