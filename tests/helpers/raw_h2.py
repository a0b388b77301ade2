"""A minimal hostile HTTP/2 client, for the tests where the point is a gRPC peer that misbehaves:
streams whose message never completes, connections that never send a request.

It speaks just enough HTTP/2 (RFC 9113) to open gRPC streams: the preface, SETTINGS and their
ack, HEADERS in HPACK literals (no table, no Huffman), DATA within the peer's flow-control
windows, PING acks. Real gRPC clients cannot send half a message; this one can.
"""

from __future__ import annotations

import asyncio
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
_INITIAL_WINDOW = 65_535


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) >= 127:  # a 7-bit prefix integer: longer strings continue in 7-bit groups
        rest, out = len(raw) - 127, bytearray([127])
        while rest >= 128:
            out.append(rest % 128 + 128)
            rest //= 128
        return bytes([*out, rest]) + raw
    return bytes([len(raw)]) + raw


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """HPACK literal fields without indexing, new names (0x00): valid, if wasteful."""
    return b"".join(b"\x00" + _hpack_string(name) + _hpack_string(value) for name, value in headers)


class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server, opened with `open()`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.next_stream = 1
        self.connection_window = _INITIAL_WINDOW
        self.stream_window = _INITIAL_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.windows: dict[int, int] = {}
        self.closed_streams: set[int] = set()
        self.goaway = False
        self.window_opened = asyncio.Event()

    async def open(self) -> RawGrpcConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0))
        await self.writer.drain()
        self.reading = asyncio.ensure_future(self._read_frames())
        return self

    async def start_call(self, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        """Open a stream with a gRPC call's headers; its id."""
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.windows[stream] = self.stream_window
        self.writer.write(frame(HEADERS, END_HEADERS, stream, header_block(headers)))
        await self.writer.drain()
        return stream

    async def send(self, stream: int, data: bytes, timeout: float = 10.0) -> int:
        """Send what the windows let through within `timeout` seconds (no END_STREAM); the bytes sent."""
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sent < len(data) and stream not in self.closed_streams and not self.goaway:
            room = min(self.connection_window, self.windows.get(stream, 0), 16_384, len(data) - sent)
            if room <= 0:
                self.window_opened.clear()
                try:
                    await asyncio.wait_for(self.window_opened.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                continue
            self.writer.write(frame(DATA, 0, stream, data[sent : sent + room]))
            self.connection_window -= room
            self.windows[stream] -= room
            sent += room
            await self.writer.drain()
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

    async def _read_frames(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                payload = await self.reader.readexactly(length)
                self._on_frame(kind, flags, stream, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == 0x4:
                    for open_stream in self.windows:
                        self.windows[open_stream] += value - self.stream_window
                    self.stream_window = value
            self.writer.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.writer.write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            if stream == 0:
                self.connection_window += increment
            elif stream in self.windows:
                self.windows[stream] += increment
        elif kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM):
            self.closed_streams.add(stream)
        elif kind == GOAWAY:
            self.goaway = True
        self.window_opened.set()


def grpc_message_prefix(length: int) -> bytes:
    """The 5-byte prefix of an uncompressed gRPC message of `length` bytes."""
    return b"\x00" + struct.pack(">I", length)
