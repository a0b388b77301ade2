"""A cap on the size of a request head and on the time it takes to arrive, for uvicorn's httptools protocol.

uvicorn's httptools protocol (the one `uvicorn[standard]` runs) puts no limit on the request line
and headers: a client can stream header lines into the server's memory for as long as it likes,
or trickle them to hold a connection (and a file descriptor) open forever. This subclass counts
the bytes of a head that is still arriving and arms a timer while one is; past either limit it
answers 431 or 408 and closes the connection. A head that arrives in one read, as every ordinary
request's does, costs two attribute checks and no timer.

The same subclass hands a request body to the app without uvicorn's two copies of it: uvicorn
appends each piece httptools parses into a bytearray, then copies that into the bytes it gives the
app; here the pieces are kept as they were read, and the app gets the one piece itself (or them
joined, when several arrived before it asked). Flow control is uvicorn's, on the same byte count.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

_logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024


def head_limited_protocol(head_timeout: float, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    return type(
        "HeadLimitedProtocol", (HeadLimitedProtocol,), {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout}
    )


class HeadLimitedProtocol(HttpToolsProtocol):
    """httptools with `max_head_bytes` and `head_timeout` (seconds) on every request head."""

    max_head_bytes: int
    head_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_open = False  # a head has begun and is not complete yet
        self._body_open = False  # a body is arriving
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counted = not self._body_open  # (a read that ends a body may begin a head: it is not counted)
        super().data_received(data)
        if not self._head_open or self.transport.is_closing():
            return
        if counted:
            self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, f"the request head is larger than {self.max_head_bytes} bytes")
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle.body) is bytearray and not cycle.body:  # (uvicorn's fresh buffer: each message starts one)
            cycle.body = BodyPieces()
        super().on_body(body)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True

    def on_headers_complete(self) -> None:
        self._head_open, self._body_open = False, True
        self._head_bytes = 0
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_open = False
        super().on_message_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error, as the app would, and close the connection."""
        _logger.debug("closing %s: %s", self.client, message)
        self._head_open = False
        self._stop_head_timer()
        body = json.dumps({"error": message}).encode()
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(STATUS_LINE[status] + head + body)
        self.transport.close()


class BodyPieces:
    """Body bytes not yet given to the app, as uvicorn's `RequestResponseCycle.body` uses them
    (`+=`, `len`, `bytes()`), without copying a piece in or, when there is one, out."""

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0

    def __iadd__(self, piece: bytes) -> BodyPieces:
        self.pieces.append(piece)
        self.size += len(piece)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)
