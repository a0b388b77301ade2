"""HTTP requests (with `requests`) that end by a total deadline or a stop event, whatever the sender's pace.

A socket timeout bounds the wait for *each* read, so a server that sends a byte a second never
trips it. Here a small watchdog thread watches the request in progress instead: when its deadline
passes or its stop event is set, it shuts the request's socket down, which ends the read blocked on
it at once (while the answer's head or body arrives, during a TLS handshake too). The connection
classes below tell the watchdog which socket that is; `GuardedAdapter` mounts them on a session.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

WATCH_SECONDS = 0.1  # how often the watchdog looks at the clock and the stop event

_current = threading.local()  # the Deadline of the request this thread is making


class Deadline:
    """One request's bounds: `seconds` from now, and `stop` (the caller's event) at any time.

    Used as a context manager around the request and the reading of its answer; `expired` says
    why the watchdog cut it (None when it did not).
    """

    def __init__(self, seconds: float, stop: threading.Event | None = None):
        self.at = time.monotonic() + seconds
        self.stop = stop
        self.expired: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._connection: HTTPConnection | None = None

    def __enter__(self) -> Deadline:
        _current.deadline = self
        threading.Thread(target=self._watch, name="arachne-registry-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        _current.deadline = None
        self._done.set()

    def check(self) -> str | None:
        """Why the request must end now ("time" or "stop"), else None; called between reads too."""
        if self.expired is None:
            if self.stop is not None and self.stop.is_set():
                self.expired = "stop"
            elif time.monotonic() > self.at:
                self.expired = "time"
        return self.expired

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connection = connection
        if self.expired is not None:
            self._cut()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_SECONDS):
            if self.check() is not None:
                self._cut()
                return

    def _cut(self) -> None:
        with self._lock:
            sock = getattr(self._connection, "sock", None)
        if sock is not None:
            try:  # the plain socket's shutdown (an SSLSocket's own would unwrap TLS under the reader)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _attach(connection: HTTPConnection) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(connection)


class _GuardedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:  # (a kept-alive connection connects no more)
        _attach(self)
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        _attach(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_POOLS = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connections a `Deadline` can cut (no retries: the caller decides)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = dict(_POOLS)
        return manager
