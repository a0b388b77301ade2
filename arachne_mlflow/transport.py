"""The inference hot path of `DeviceClient`: pooled keep-alive connections, one write per request.

`requests` costs about 1 ms of Python per call on a small device, more than a tiny model's
whole round trip. Here a request is one `sendmsg` of the head (built from a per-path prefix) and
the body (gathered, so a large tensor is not copied), and the response is parsed by httptools
(the C parser uvicorn uses), one parser per connection, header names and values left as bytes.
It carries only `infer`; everything else (uploads, metadata) stays on the requests session. Each
call takes an idle connection or opens one, so threads never share a connection mid-request.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque

import httptools

from arachne_mlflow.errors import DeviceUnreachableError

MAX_IDLE = 16
_RECV = 256 * 1024


class _Stale(Exception):
    """A kept-alive connection the server had already closed."""


class _Connection:
    """One HTTP/1.1 connection: `exchange` sends a request and reads its whole response."""

    def __init__(self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ssl_context.wrap_socket(sock, server_hostname=host) if ssl_context is not None else sock
        self._tls = ssl_context is not None
        self._response = _Response()
        self._parser = httptools.HttpResponseParser(self._response)
        self.open = True

    def exchange(self, head: bytes, body: bytes | memoryview) -> tuple[int, dict[bytes, bytes], bytes]:
        self._send(head, body)
        return self._read_response()

    def _send(self, head: bytes, body: bytes | memoryview) -> None:
        if self._tls:  # SSL sockets have no sendmsg
            self.sock.sendall(head)
            self.sock.sendall(body)
            return
        sent = self.sock.sendmsg([head, body])
        if sent < len(head):
            self.sock.sendall(memoryview(head)[sent:])
            self.sock.sendall(body)
        elif sent < len(head) + len(body):
            self.sock.sendall(memoryview(body)[sent - len(head):])

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

    `headers` go with every request (the bearer token).
    """

    def __init__(self, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None,
                 headers: dict[str, str] | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self._ssl_context = ssl_context
        self._idle: deque[_Connection] = deque()  # append/pop are atomic
        fixed = [f"Host: {host}:{port}\r\n", *[f"{k}: {v}\r\n" for k, v in (headers or {}).items()]]
        self._fixed = "".join(fixed).encode("latin-1")
        self._heads: dict[str, bytes] = {}

    def post(self, path: str, body: bytes | memoryview, headers: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request; `headers` are extra header lines, CRLF-terminated bytes. Returns
        (status, headers by lower-case name, body), header names and values as bytes."""
        prefix = self._heads.get(path)
        if prefix is None:
            prefix = self._heads[path] = b"POST %s HTTP/1.1\r\n%s" % (path.encode("latin-1"), self._fixed)
        head = b"%sContent-Length: %d\r\n%s\r\n" % (prefix, len(body), headers)
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = None
        try:
            if connection is not None:
                try:
                    result = connection.exchange(head, body)
                except (_Stale, BrokenPipeError, ConnectionResetError):
                    connection.close()  # the server closed an idle connection: once more, fresh
                    connection = None
            if connection is None:
                connection = self._connect()
                result = connection.exchange(head, body)
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
        return _Connection(self.host, self.port, self.timeout, self._ssl_context)

    def _unreachable(self, err: BaseException) -> DeviceUnreachableError:
        reason = "the connection closed without a response" if isinstance(err, _Stale) else str(err)
        return DeviceUnreachableError(
            f"device server at {self.host}:{self.port} is unreachable ({type(err).__name__}): {reason}"
        )
