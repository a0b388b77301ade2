"""The inference hot path of `DeviceClient`: a small pool of keep-alive `http.client` connections.

`requests` costs about 1 ms of Python per call on a small device, more than a tiny model's
whole round trip; `http.client` sends the same request for a third of that. It carries only
`infer`: everything else (uploads, metadata) stays on the requests session. Each call takes an
idle connection (or opens one), so threads never share a connection mid-request.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections import deque
from typing import Any

from arachne_mlflow.errors import DeviceUnreachableError

# A kept-alive connection the server has since closed fails in one of these ways on reuse.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.CannotSendRequest)
MAX_IDLE = 16


class Transport:
    """POSTs to `host:port` over pooled persistent connections (HTTPS when `ssl_context`)."""

    def __init__(self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None):
        self.host, self.port, self.timeout = host, port, timeout
        self._ssl_context = ssl_context
        self._idle: deque[http.client.HTTPConnection] = deque()  # append/pop are atomic

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Send one request; returns (status, headers with lower-case names, body)."""
        try:
            connection, reused = self._idle.pop(), True
        except IndexError:
            connection, reused = self._connect(), False
        try:
            result = _exchange(connection, path, body, headers)
        except _STALE as err:
            connection.close()
            if not reused:
                raise self._unreachable(err) from err
            connection = self._connect()  # the server closed an idle connection: once more, fresh
            try:
                result = _exchange(connection, path, body, headers)
            except (OSError, http.client.HTTPException) as err2:
                connection.close()
                raise self._unreachable(err2) from err2
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            raise self._unreachable(err) from err
        if len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        else:
            connection.close()
        return result

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break

    def _connect(self) -> http.client.HTTPConnection:
        if self._ssl_context is not None:
            return _HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ssl_context)
        return _HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _unreachable(self, err: BaseException) -> DeviceUnreachableError:
        return DeviceUnreachableError(
            f"device server at {self.host}:{self.port} is unreachable ({type(err).__name__}): {err}"
        )


class _HTTPConnection(http.client.HTTPConnection):
    """http.client writes headers and body separately: without TCP_NODELAY, Nagle's algorithm
    holds the body back until the server acknowledges the headers."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _exchange(connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> Any:
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    if response.will_close:
        connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data
