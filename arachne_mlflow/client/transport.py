"""The inference hot path of `DeviceClient`: pooled keep-alive connections, one write per request.

`requests` costs more Python per call on a small device than a tiny model's whole round trip.
Here a request is one `sendmsg` of the head (built from a per-path prefix) and the pieces of the
body (gathered, so a large tensor is not copied), and the response is parsed by httptools (the C
parser uvicorn uses), one parser per connection, header names and values left as bytes. On 64-bit
Linux a plain connection is a blocking socket whose timeout the kernel keeps (`SO_RCVTIMEO` /
`SO_SNDTIMEO`): a Python socket timeout polls before every send and receive, one system call more
per call.

It carries only `infer`; everything else (uploads, metadata) stays on the requests session. Each
call takes an idle connection or opens one, so threads never share a connection mid-request.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
from collections import deque

import httptools

from arachne_mlflow.client.address import authority
from arachne_mlflow.client.failures import ConnectTimeoutError, unreachable
from arachne_mlflow.errors import DeviceUnreachableError

MAX_IDLE = 16
_RECV = 256 * 1024
_MAX_GATHER = 64  # buffers per sendmsg (the system allows 1024); more are joined first
_KERNEL_TIMEOUTS = sys.platform.startswith("linux") and struct.calcsize("l") == 8  # timeval of two longs


class _Stale(Exception):
    """A kept-alive connection the server had already closed."""


class _Connection:
    """One HTTP/1.1 connection: `exchange` sends a request and reads its whole response."""

    def __init__(
        self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None, connect_timeout: float
    ):
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError as err:
            raise ConnectTimeoutError(f"timed out connecting after {connect_timeout} s") from err
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        self._tls = ssl_context is not None
        if self._tls:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        elif _KERNEL_TIMEOUTS and timeout:
            sock.settimeout(None)
            interval = struct.pack("ll", int(timeout), int(timeout % 1 * 1_000_000))  # struct timeval
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
        self.sock = sock
        self.timeout = timeout
        self._response = _Response()
        self._parser = httptools.HttpResponseParser(self._response)
        self.open = True

    def exchange(self, buffers: list[bytes | memoryview]) -> tuple[int, dict[bytes, bytes], bytes]:
        try:
            self._send(buffers)
            return self._read_response()
        except BlockingIOError as err:  # the kernel's timeout ran out
            self.close()
            raise TimeoutError(f"timed out: no progress in {self.timeout} s") from err

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        if self._tls:  # SSL sockets have no sendmsg
            for buffer in buffers:
                self.sock.sendall(buffer)
            return
        sent = self.sock.sendmsg(buffers)
        for buffer in buffers:  # what one sendmsg did not take (a large body), in order
            if sent >= len(buffer):
                sent -= len(buffer)
                continue
            self.sock.sendall(memoryview(buffer)[sent:] if sent else buffer)
            sent = 0

    def _read_response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        response, parser = self._response, self._parser
        response.reset()
        data = self.sock.recv(_RECV)
        if not data:
            self.close()
            raise _Stale()
        parser.feed_data(data)
        while not response.complete:
            data = self.sock.recv(_RECV)
            if not data:
                self.close()
                raise ConnectionResetError("the server closed the connection mid-response")
            parser.feed_data(data)
        # (httptools' should_keep_alive() reads False once a message is complete: decide here)
        if parser.get_http_version() != "1.1" or response.headers.get(b"connection", b"").lower() == b"close":
            self.close()
        body = response.body
        return parser.get_status_code(), response.headers, body[0] if len(body) == 1 else b"".join(body)

    def close(self) -> None:
        self.open = False
        self.sock.close()


class _Response:
    """httptools callbacks collecting one response at a time."""

    def reset(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Transport:
    """POSTs to `host:port` over pooled persistent connections (HTTPS when `ssl_context`).

    `headers` go with every request (the bearer token); `where` is how errors name the device.
    `connect_timeout` bounds opening a
    connection, `timeout` each wait for the server once connected; `host` is a socket's (an IPv6
    literal without brackets).
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        headers: dict[str, str] | None = None,
        connect_timeout: float | None = None,
        where: str | None = None,
    ):
        self.host, self.port, self.timeout = host, port, timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.address = authority(host, port)
        self.where = where or f"device server at {self.address}"
        self._ssl_context = ssl_context
        self._idle: deque[_Connection] = deque()  # append/pop are atomic
        fixed = [f"Host: {self.address}\r\n", *[f"{k}: {v}\r\n" for k, v in (headers or {}).items()]]
        self._fixed = "".join(fixed).encode("latin-1")
        self._heads: dict[str, bytes] = {}

    def post(
        self, path: str, body: list[bytes | memoryview], headers: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request whose body is the pieces `body` (sent gathered, not joined); `headers`
        are extra header lines, CRLF-terminated bytes. Returns (status, headers by lower-case
        name, body), header names and values as bytes."""
        prefix = self._heads.get(path)
        if prefix is None:
            prefix = self._heads[path] = b"POST %s HTTP/1.1\r\n%s" % (path.encode("latin-1"), self._fixed)
        size = 0
        for part in body:
            size += len(part)
        buffers = [b"%sContent-Length: %d\r\n%s\r\n" % (prefix, size, headers), *body]
        if len(buffers) > _MAX_GATHER:
            buffers = [b"".join(buffers)]
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = None
        try:
            if connection is not None:
                try:
                    result = connection.exchange(buffers)
                except (_Stale, BrokenPipeError, ConnectionResetError):
                    connection.close()  # the server closed an idle connection: once more, fresh
                    connection = None
            if connection is None:
                connection = self._connect()
                result = connection.exchange(buffers)
        except (OSError, httptools.HttpParserError, _Stale) as err:
            if connection is not None:
                connection.close()
            raise self._unreachable(err) from err
        if connection.open and len(self._idle) < MAX_IDLE:
            self._idle.append(connection)
        elif connection.open:
            connection.close()
        return result

    def close(self) -> None:
        """Close the idle connections."""
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break

    def _connect(self) -> _Connection:
        return _Connection(self.host, self.port, self.timeout, self._ssl_context, self.connect_timeout)

    def _unreachable(self, err: BaseException) -> DeviceUnreachableError:
        if isinstance(err, _Stale):
            return DeviceUnreachableError(f"{self.where} is unreachable: the connection closed without a response")
        return unreachable(self.where, err)
