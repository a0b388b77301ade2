"""How a rollout moves through a fleet: all at once, in batches (`rolling`) or a canary batch first.

    -C strategy=all                          every device at once
    -C strategy=rolling -C batch=N|P%        one batch at a time (the default, batch 25%)
    -C strategy=canary -C canary=N|P%        the canary batch first, then the rest in batches
    -C max_failures=N                        halt once more than N devices failed (default: no limit)
    -C gate_timeout=S -C gate_seconds=S      the health gate's time limit, and how long it watches errors
    -C gate_max_p99_ms=MS                    the gate times the new version on the device: p99 within MS
    -C gate_latency_regression=P%            ... and p99 and median at most P% above the old version's
    -C gate_repeats=N                        timed runs per latency measurement (default 20)

Batches follow the target's order (`arachne-jetson://@canary,@lyon` puts the canary group first).
Each batch is gated (gate.py) before the next starts; rollout.py runs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from arachne_mlflow.errors import InvalidInputError

ALL, ROLLING, CANARY = "all", "rolling", "canary"
STRATEGIES = (ALL, ROLLING, CANARY)
DEFAULT_BATCH = "25%"
DEFAULT_CANARY = "10%"
DEFAULT_GATE_TIMEOUT = 5.0  # seconds for readiness and a smoke inference on one device
MAX_GATE_SECONDS = 3600.0  # a bound on both gate settings: a typo must not hang a rollout for days
DEFAULT_GATE_REPEATS = 20  # timed runs per latency measurement
MAX_GATE_REPEATS = 1000  # the device's benchmark route bounds its own time too (--benchmark-seconds)
LATENCY_KEYS = ("gate_max_p99_ms", "gate_latency_regression", "gate_repeats")
ROLLOUT_KEYS = ("strategy", "batch", "canary", "max_failures", "gate_timeout", "gate_seconds", *LATENCY_KEYS)
_SIZE = re.compile(r"^(?:\d+|\d+(?:\.\d+)?%)$")
D = TypeVar("D")


@dataclass(frozen=True)
class Strategy:
    """A rollout's strategy and gate settings, checked once when the command's config is read."""

    name: str = ROLLING
    batch: str = DEFAULT_BATCH  # devices per batch: "N" or "P%" of the fleet (rolling, and canary's rest)
    canary: str | None = None  # the canary batch (canary only)
    max_failures: int | None = None  # None: failed devices alone never halt a rollout (a failed gate does)
    gate_timeout: float = DEFAULT_GATE_TIMEOUT
    gate_seconds: float = 0.0  # watch the device's error counter this long after the switch (0: not at all)
    gate_max_p99_ms: float | None = None  # the new version's p99 on the device must be within this (None: any)
    gate_latency_regression: float | None = None  # allowed slowdown against the old version, 0.1 = 10% (None: any)
    gate_repeats: int = DEFAULT_GATE_REPEATS

    @property
    def times_latency(self) -> bool:
        """Whether the gate times the model on the device (only when a latency setting asks for it)."""
        return self.gate_max_p99_ms is not None or self.gate_latency_regression is not None

    def batches(self, devices: Sequence[D]) -> list[list[D]]:
        """`devices` cut into the batches this strategy rolls out, in order."""
        devices = list(devices)
        if not devices:
            return []
        if self.name == ALL:
            return [devices]
        first: list[list[D]] = []
        if self.name == CANARY:
            size = batch_size(self.canary or DEFAULT_CANARY, len(devices))
            first, devices = [devices[:size]], devices[size:]
        size = batch_size(self.batch, len(devices) + sum(map(len, first)))
        return first + [devices[i : i + size] for i in range(0, len(devices), size)]

    def to_dict(self) -> dict[str, Any]:
        """What the registry records (`strategy` of the desired state): the name and what it uses."""
        recorded: dict[str, Any] = {"name": self.name}
        if self.name != ALL:
            recorded["batch"] = self.batch
        if self.name == CANARY:
            recorded["canary"] = self.canary or DEFAULT_CANARY
        if self.max_failures is not None:
            recorded["max_failures"] = self.max_failures
        recorded["gate_timeout"] = self.gate_timeout
        if self.gate_seconds:
            recorded["gate_seconds"] = self.gate_seconds
        if self.gate_max_p99_ms is not None:
            recorded["gate_max_p99_ms"] = self.gate_max_p99_ms
        if self.gate_latency_regression is not None:
            recorded["gate_latency_regression"] = f"{self.gate_latency_regression * 100:g}%"
        if self.times_latency:
            recorded["gate_repeats"] = self.gate_repeats
        return recorded

    @classmethod
    def from_recorded(cls, recorded: Mapping[str, Any]) -> Strategy:
        """The strategy a desired state recorded (`to_dict`), for `fleet sync` to roll out the same way."""
        config = {("strategy" if key == "name" else key): value for key, value in recorded.items()}
        return strategy_of({k: v for k, v in config.items() if k in ROLLOUT_KEYS})


def batch_size(size: str, devices: int) -> int:
    """Devices in a batch of `size` ("N" or "P%") out of `devices`: at least one, at most all."""
    if size.endswith("%"):
        count = math.ceil(float(size[:-1]) / 100 * devices)
    else:
        count = int(size)
    return max(1, min(devices, count))


def strategy_of(config: Mapping[str, Any]) -> Strategy:
    """The strategy in `config` (`-C` values are strings; recorded ones may be numbers)."""
    name = str(config.get("strategy") or (CANARY if config.get("canary") is not None else ROLLING)).strip().lower()
    if name not in STRATEGIES:
        raise InvalidInputError(f"config strategy must be one of {list(STRATEGIES)}, got {config.get('strategy')!r}")
    batch = _size(config, "batch")
    canary = _size(config, "canary")
    if name == ALL and batch is not None:
        raise InvalidInputError("config batch goes with strategy=rolling or canary, not strategy=all")
    if canary is not None and name != CANARY:
        raise InvalidInputError(f"config canary goes with strategy=canary, not strategy={name}")
    max_failures = config.get("max_failures")
    if max_failures is not None:
        if not str(max_failures).strip().isdigit():
            raise InvalidInputError(f"config max_failures must be a number of devices >= 0, got {max_failures!r}")
        max_failures = int(str(max_failures).strip())
    return Strategy(
        name=name,
        batch=batch or DEFAULT_BATCH,
        canary=canary,
        max_failures=max_failures,
        gate_timeout=config_seconds(config, "gate_timeout", DEFAULT_GATE_TIMEOUT),
        gate_seconds=config_seconds(config, "gate_seconds", 0.0, zero=True),
        **_latency(config),
    )


def _latency(config: Mapping[str, Any]) -> dict[str, Any]:
    """The latency gate's settings in `config` (absent: the gate times nothing)."""
    budget, regression, repeats = (config.get(key) for key in LATENCY_KEYS)
    settings: dict[str, Any] = {}
    if budget is not None and budget != "":
        settings["gate_max_p99_ms"] = _number(budget, "gate_max_p99_ms", "a number of milliseconds > 0")
    if regression is not None and regression != "":
        text = str(regression).strip()
        if not text.endswith("%"):
            raise InvalidInputError(f"config gate_latency_regression must be a percentage (10%), got {regression!r}")
        settings["gate_latency_regression"] = _number(text[:-1], "gate_latency_regression", "a percentage > 0") / 100
    if repeats is not None and repeats != "":
        text = str(repeats).strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_GATE_REPEATS:
            raise InvalidInputError(f"config gate_repeats must be 1 to {MAX_GATE_REPEATS} runs, got {repeats!r}")
        settings["gate_repeats"] = int(text)
        if len(settings) == 1:
            raise InvalidInputError("config gate_repeats goes with gate_max_p99_ms or gate_latency_regression")
    return settings


def _number(value: Any, key: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"config {key} must be {what}, got {value!r}") from err
    if not 0 < number < math.inf:
        raise InvalidInputError(f"config {key} must be {what}, got {value!r}")
    return number


def _size(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None or value == "":
        return None
    text = str(value).strip()
    percent = text.endswith("%")
    if not _SIZE.match(text) or not 0 < float(text.rstrip("%")) <= (100 if percent else math.inf):
        raise InvalidInputError(f"config {key} must be a count of devices (2) or a percentage (25%), got {value!r}")
    return text


def config_seconds(
    config: Mapping[str, Any], key: str, default: float, zero: bool = False, maximum: float = MAX_GATE_SECONDS
) -> float:
    """A `-C` setting in seconds, `default` when absent; bounded, so that a typo cannot hang a command for days."""
    value = config.get(key)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"config {key} must be a number of seconds, got {value!r}") from err
    low_ok = seconds >= 0 if zero else seconds > 0
    if not (low_ok and seconds <= maximum):
        low = "0" if zero else "more than 0"
        raise InvalidInputError(f"config {key} must be {low} to {maximum:g} seconds, got {value!r}")
    return seconds
