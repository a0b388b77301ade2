"""Whether one served request is kept: sampling rate, output conditions, then caps per minute, hour and day.

The rate is drawn first (one random number: the cheap refusal most requests get), the output
conditions next, the caps last, so that a cap counts only samples that would have been kept. A
request for a shadow model (shadow.py) is kept only once the shadow disagrees: `decide` then only
checks that the caps have room, and `take` counts the sample when it is kept.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from arachne_mlflow.model.capture_rules import CaptureRules

_WINDOWS = (("per_minute", 60), ("per_hour", 3600), ("per_day", 86400))

SKIPPED, KEPT, CAPPED = "skipped", "kept", "capped"


class Sampler:
    """One model's sampling state (its caps' counts); `seed` makes the draws repeatable (tests)."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed).random
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, int]] = {}  # cap key -> (window index, samples kept in it)

    def decide(self, rules: CaptureRules, outputs: dict[str, np.ndarray], now: float | None = None) -> str:
        """SKIPPED (not drawn, or the outputs miss the conditions), CAPPED (a cap is spent) or KEPT;
        `now` (Unix time, default the clock's) places the request in the caps' windows."""
        if rules.rate < 1.0 and self._random() >= rules.rate:
            return SKIPPED
        if rules.has_condition and not meets_conditions(rules, outputs):
            return SKIPPED
        # a request for a shadow model only looks at the caps: they count the samples it keeps (`take`)
        now = time.time() if now is None else now
        return KEPT if self._take(rules, now, peek=rules.shadow is not None) else CAPPED

    def take(self, rules: CaptureRules, now: float | None = None) -> bool:
        """Count one kept sample against the caps; False (nothing counted) if a cap is spent."""
        return self._take(rules, time.time() if now is None else now)

    def _take(self, rules: CaptureRules, now: float, peek: bool = False) -> bool:
        caps = [(key, getattr(rules, key), int(now // seconds)) for key, seconds in _WINDOWS]
        caps = [(key, cap, window) for key, cap, window in caps if cap is not None]
        if not caps:
            return True
        with self._lock:
            counts = []
            for key, cap, window in caps:
                seen, count = self._windows.get(key, (window, 0))
                count = count if seen == window else 0
                if count >= cap:
                    return False
                counts.append((key, window, count))
            if peek:
                return True
            for key, window, count in counts:
                self._windows[key] = (window, count + 1)
        return True


def meets_conditions(rules: CaptureRules, outputs: dict[str, np.ndarray]) -> bool:
    """Whether any row of the rules' output (scores on its last axis) meets every condition given."""
    scores = outputs.get(rules.output or "")
    if scores is None:
        return False
    try:
        rows = np.asarray(scores).reshape(-1, scores.shape[-1] if scores.ndim else 1)
        if rows.size == 0:
            return False
        keep = np.ones(rows.shape[0], dtype=bool)
        if rules.max_score is not None:
            low, high = rules.max_score
            top = rows.max(axis=1)
            keep &= (top >= low) & (top <= high)
        if rules.classes is not None:
            keep &= np.isin(rows.argmax(axis=1), np.fromiter(rules.classes, dtype=np.int64))
        return bool(keep.any())
    except (TypeError, ValueError):  # an output that holds no numbers (BYTES) meets no condition
        return False
