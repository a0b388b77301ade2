"""A hostile HTTP/2 client (the `h2` protocol library over asyncio), for the tests where the point is
a gRPC peer that misbehaves: streams whose message never completes, connections that never send a
request. Real gRPC clients cannot send half a message; this one can.
"""

from __future__ import annotations

import asyncio
import struct

import h2.config
import h2.connection
import h2.events

_CLOSING = (h2.events.StreamReset, h2.events.StreamEnded)


class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server, opened with `open()`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.closed_streams: set[int] = set()
        self.goaway = False
        self.window_opened = asyncio.Event()

    async def open(self) -> RawGrpcConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.h2.initiate_connection()
        await self._flush()
        self.reading = asyncio.ensure_future(self._read())
        return self

    async def start_call(self, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        """Open a stream with a gRPC call's headers; its id."""
        stream = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.h2.send_headers(stream, headers)
        await self._flush()
        return stream

    async def send(self, stream: int, data: bytes, timeout: float = 10.0) -> int:
        """Send what the peer's flow-control windows let through within `timeout` seconds (the stream is
        left open); the bytes sent."""
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sent < len(data) and stream not in self.closed_streams and not self.goaway:
            room = min(self.h2.local_flow_control_window(stream), self.h2.max_outbound_frame_size, len(data) - sent)
            if room <= 0:
                self.window_opened.clear()
                try:
                    await asyncio.wait_for(self.window_opened.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                continue
            self.h2.send_data(stream, data[sent : sent + room])
            sent += room
            await self._flush()
        return sent

    @property
    def is_closed(self) -> bool:
        return self.reading.done()

    async def close(self) -> None:
        self.reading.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def _flush(self) -> None:
        self.writer.write(self.h2.data_to_send())
        await self.writer.drain()

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65_536):
                for event in self.h2.receive_data(data):
                    if isinstance(event, _CLOSING):
                        self.closed_streams.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = True
                self.window_opened.set()
                await self._flush()  # (settings and ping acknowledgements)
        except (ConnectionError, OSError, h2.exceptions.ProtocolError):
            return


def grpc_message_prefix(length: int) -> bytes:
    """The 5-byte prefix of an uncompressed gRPC message of `length` bytes."""
    return b"\x00" + struct.pack(">I", length)
