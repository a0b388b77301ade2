"""An upload's body as a blocking file: the store extracts it in a worker thread as it arrives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

from arachne_mlflow.errors import ArachneError, InvalidInputError, UnsafeArchiveError

# Seconds an upload may go without sending a byte before it is abandoned (frees its thread).
UPLOAD_IDLE_TIMEOUT = 120.0


class StreamReader(io.RawIOBase):
    """A blocking file over an async byte stream: a worker thread reads what the event loop receives."""

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop, max_bytes: int):
        self._chunks = chunks
        self._loop = loop
        self._max_bytes = max_bytes
        self._pending = b""
        self._received = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending and not self._eof:
            future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            try:
                chunk = future.result(timeout=UPLOAD_IDLE_TIMEOUT)
            except concurrent.futures.TimeoutError as err:
                future.cancel()
                raise InvalidInputError(f"upload stalled: no data for {UPLOAD_IDLE_TIMEOUT:.0f} s") from err
            self._count(chunk)
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    async def drain(self) -> None:
        """Read the rest of the body, up to the cap (beyond it, the route closes the connection unread)."""
        with contextlib.suppress(ArachneError, asyncio.TimeoutError):
            while not self._eof:
                self._count(await asyncio.wait_for(self._next(), UPLOAD_IDLE_TIMEOUT))

    def _count(self, chunk: bytes) -> None:
        self._received += len(chunk)
        self._eof = not chunk
        if self._received > self._max_bytes:
            raise UnsafeArchiveError(f"upload exceeds the limit of {self._max_bytes} bytes")

    async def _next(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""
