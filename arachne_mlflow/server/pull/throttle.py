"""A bandwidth cap: a token bucket that paces reads of a file, so an upload's body never runs faster than
the cap (a device on a metered or shared link delivers its samples without taking the link).
"""

from __future__ import annotations

import threading
import time
from typing import BinaryIO

from arachne_mlflow.errors import InvalidInputError

STEP_SECONDS = 0.1  # the longest one read waits: a stop is seen within it


class TokenBucket:
    """At most `rate` bytes a second on average, in bursts of at most `rate * STEP_SECONDS` bytes."""

    def __init__(self, rate: float, stop: threading.Event | None = None):
        if not rate > 0:
            raise InvalidInputError(f"a bandwidth cap is a positive number of bytes a second, not {rate}")
        self.rate, self.stop = float(rate), stop
        self.burst = max(1, int(self.rate * STEP_SECONDS))
        self._tokens, self._at = 0.0, time.monotonic()

    def take(self, wanted: int) -> int:
        """How many of `wanted` bytes may go now (at least one), after waiting for them; 0 once stopped."""
        wanted = max(1, min(wanted, self.burst))
        while True:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                granted = min(wanted, int(self._tokens))
                self._tokens -= granted
                return granted
            delay = (1 - self._tokens) / self.rate
            if self.stop is None:
                time.sleep(delay)
            elif self.stop.wait(delay):
                return 0


class PacedReader:
    """A file read no faster than `bucket` allows (`bucket` None: unpaced); `len()` is what is left to send."""

    def __init__(self, file: BinaryIO, size: int, bucket: TokenBucket | None):
        self.file, self.left, self.bucket = file, size, bucket

    def __len__(self) -> int:
        return self.left

    def read(self, size: int = -1) -> bytes:
        wanted = self.left if size is None or size < 0 else min(size, self.left)
        if self.bucket is not None and wanted:
            wanted = self.bucket.take(wanted)
        data = self.file.read(wanted)
        self.left -= len(data)
        return data
