"""Waiting for something a server does in the background, bounded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 120.0, interval: float = 0.1) -> T:
    """The first truthy value of `condition()`; fails after `timeout` seconds (a bound that only catches hangs)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)
    return value
