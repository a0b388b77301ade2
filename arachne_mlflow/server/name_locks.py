"""One lock per model name, serializing the operations on that name while other names go on.

A name's lock exists only while an operation on it runs or waits: a request naming an unknown model
leaves nothing behind, however many names are tried.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class _NameLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: int = 0  # operations running or waiting on the name


class NameLocks:
    """`with locks.hold(name):` runs alone among the operations on `name`."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, _NameLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(name, _NameLock())
            lock.holders += 1
        try:
            with lock.lock:
                yield
        finally:
            with self._guard:
                lock.holders -= 1
                if not lock.holders:
                    del self._locks[name]
