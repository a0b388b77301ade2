"""Which field samples a device keeps for a served model: capture rules, parsed and checked once.

Rules come from the model's MLmodel (`arachne.capture`), or are set on the device per model (the
`/v2/repository/models/{name}/capture` route, or `-C capture=...` on a push), which wins. No rules,
`{}` or `null` mean capture is off: nothing is sampled, copied or written.

    capture:
      rate: 0.01                 # fraction of requests sampled (0..1), required
      per_minute: 60             # caps on captured samples (optional, each)
      per_hour: 1000
      per_day: 10000
      output: probabilities      # the output the conditions read (required with a condition)
      max_score: [0.2, 0.6]      # keep only requests whose top score lies in this band (optional)
      classes: [3, 7]            # keep only requests whose top class is one of these (optional)
      keep_outputs: true         # store the answer beside the inputs (default true)
      budget_mb: 256             # disk the model's spool may use; the oldest segments go first
      shadow:                    # keep only requests another served model answers differently (optional)
        model: classifier-v2     # a model on the same device
        atol: 0.001              # outputs within atol + rtol * |answer| agree (np.allclose)
        rtol: 0
        output: probabilities    # the output compared (default: every output of the model)
        per_second: 10           # shadow runs at most this often; the excess is dropped (shadow_busy)

A condition reads each row of the output (its last axis holds the scores): a request is kept when
any row meets every condition given. The shadow model runs after the answer is sent, off the event
loop, and only for requests that passed the rate, the conditions and the caps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.names import is_model_name

RULE_KEYS = (
    "rate",
    "per_minute",
    "per_hour",
    "per_day",
    "output",
    "max_score",
    "classes",
    "keep_outputs",
    "budget_mb",
    "shadow",
)
SHADOW_KEYS = ("model", "atol", "rtol", "output", "per_second")
DEFAULT_BUDGET_MB = 256.0
MAX_BUDGET_MB = 1024.0 * 1024  # a terabyte: a bound on a typo, not a recommendation
MAX_CAP = 10**9
MAX_CLASSES = 4096
DEFAULT_SHADOW_PER_SECOND = 10.0
MAX_SHADOW_PER_SECOND = 1000.0
MAX_TOLERANCE = 1e12


@dataclass(frozen=True)
class ShadowRule:
    """Keep a request only when `model` answers it differently (beyond `atol`/`rtol`, on `output`
    or every output); at most `per_second` shadow runs a second."""

    model: str
    atol: float = 1e-3
    rtol: float = 0.0
    output: str | None = None
    per_second: float = DEFAULT_SHADOW_PER_SECOND

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": self.model, "atol": self.atol, "rtol": self.rtol}
        if self.output is not None:
            data["output"] = self.output
        data["per_second"] = self.per_second
        return data


@dataclass(frozen=True)
class CaptureRules:
    """A served model's capture rules, checked (see the module's docstring for the meaning of each)."""

    rate: float
    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None
    output: str | None = None
    max_score: tuple[float, float] | None = None
    classes: frozenset[int] | None = None
    keep_outputs: bool = True
    budget_mb: float = DEFAULT_BUDGET_MB
    shadow: ShadowRule | None = None

    @property
    def has_condition(self) -> bool:
        return self.max_score is not None or self.classes is not None

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 1024 * 1024)

    def to_dict(self) -> dict[str, Any]:
        """The rules as JSON-ready data that `parse_rules` reads back to equal rules (unset keys left out)."""
        data: dict[str, Any] = {"rate": self.rate, "keep_outputs": self.keep_outputs, "budget_mb": self.budget_mb}
        for key in ("per_minute", "per_hour", "per_day", "output"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.max_score is not None:
            data["max_score"] = list(self.max_score)
        if self.classes is not None:
            data["classes"] = sorted(self.classes)
        if self.shadow is not None:
            data["shadow"] = self.shadow.to_dict()
        return data


def parse_rules(data: Any, where: str = "capture rules") -> CaptureRules | None:
    """`CaptureRules` from plain data (a mapping of `RULE_KEYS`); None (capture off) for None or `{}`.

    `InvalidInputError` names `where`, the key and what it must be.
    """
    if data is None or (isinstance(data, Mapping) and not data):
        return None
    _check_keys(data, RULE_KEYS, where)
    if "rate" not in data:
        raise InvalidInputError(f"{where}: 'rate' is required (the fraction of requests sampled, 0..1)")
    rules = CaptureRules(
        rate=_number(data, "rate", 0.0, 1.0, where),
        per_minute=_cap(data, "per_minute", where),
        per_hour=_cap(data, "per_hour", where),
        per_day=_cap(data, "per_day", where),
        output=_output(data, where),
        max_score=_band(data, where),
        classes=_classes(data, where),
        keep_outputs=_flag(data, "keep_outputs", True, where),
        budget_mb=_number(data, "budget_mb", 0.0, MAX_BUDGET_MB, where, DEFAULT_BUDGET_MB, above_low=True),
        shadow=_shadow(data.get("shadow"), f"{where}: 'shadow'"),
    )
    if rules.has_condition and rules.output is None:
        raise InvalidInputError(f"{where}: 'max_score' and 'classes' read an output: name it in 'output'")
    return rules


def _check_keys(data: Any, keys: tuple[str, ...], where: str) -> None:
    """`data` is a mapping whose keys are all in the allow-list `keys`."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{where} must be a mapping of {list(keys)}, got {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in keys)
    if unknown:
        raise InvalidInputError(f"{where}: unknown keys {unknown}; known: {list(keys)}")


def _shadow(data: Any, where: str) -> ShadowRule | None:
    if data is None:
        return None
    _check_keys(data, SHADOW_KEYS, where)
    model = data.get("model")
    if not is_model_name(model):
        raise InvalidInputError(
            f"{where}: 'model' must name a model served on the device (1-128 letters, digits, '.', '_' or '-'), "
            f"got {str(model)[:140]!r}"
        )
    return ShadowRule(
        model=model,
        atol=_number(data, "atol", 0.0, MAX_TOLERANCE, where, 1e-3),
        rtol=_number(data, "rtol", 0.0, MAX_TOLERANCE, where, 0.0),
        output=_output(data, where),
        per_second=_number(
            data, "per_second", 0.0, MAX_SHADOW_PER_SECOND, where, DEFAULT_SHADOW_PER_SECOND, above_low=True
        ),
    )


def _number(
    data: Mapping, key: str, low: float, high: float, where: str, default: float = 0.0, above_low: bool = False
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{where}: {key!r} must be a number, got {value!r}")
    if not (low < value if above_low else low <= value) or value > high:
        raise InvalidInputError(f"{where}: {key!r} must be in {'(' if above_low else '['}{low}, {high}], got {value}")
    return float(value)


def _cap(data: Mapping, key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CAP:
        raise InvalidInputError(f"{where}: {key!r} must be a whole number of samples in [0, {MAX_CAP}], got {value!r}")
    return value


def _output(data: Mapping, where: str) -> str | None:
    value = data.get("output")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise InvalidInputError(f"{where}: 'output' must be an output's name, got {str(value)[:100]!r}")
    return value


def _band(data: Mapping, where: str) -> tuple[float, float] | None:
    value = data.get("max_score")
    if value is None:
        return None
    numbers = value if isinstance(value, (list, tuple)) else ()
    if len(numbers) != 2 or not all(
        isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers
    ):
        raise InvalidInputError(f"{where}: 'max_score' must be a band [low, high] of two numbers, got {value!r}")
    low, high = float(numbers[0]), float(numbers[1])
    if low > high:
        raise InvalidInputError(f"{where}: 'max_score' band [{low}, {high}] has its low end above its high end")
    return low, high


def _classes(data: Mapping, where: str) -> frozenset[int] | None:
    value = data.get("classes")
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else None
    if (
        items is None
        or not 0 < len(items) <= MAX_CLASSES
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items)
    ):
        raise InvalidInputError(
            f"{where}: 'classes' must be a list of 1 to {MAX_CLASSES} class indices (whole numbers >= 0), "
            f"got {str(value)[:100]}"
        )
    return frozenset(items)


def _flag(data: Mapping, key: str, default: bool, where: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value
