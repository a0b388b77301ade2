"""The infer route, answered in front of Starlette: the one route whose cost every inference pays.

Starlette's middleware stack, router, Request and Response objects cost more per request
than a small model's inference (docs/performance.md has the figures). `InferRoute` sits in front
of the app: `POST /v2/models/{model}[/versions/{version}]/infer` is read from the ASGI messages
directly and answered with two `send` calls; every other request goes on to Starlette. Errors
become the app's JSON error responses through the same handler as every other route.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import codec
from arachne_mlflow.server.dataplane import Dataplane

_PREFIX = "/v2/models/"
_SUFFIX = "/infer"
_HEADER_LENGTH = codec.HEADER_LENGTH.lower().encode()
_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")


class RequestTooLarge(InvalidInputError):
    status_code = 413


class MethodNotAllowed(InvalidInputError):
    status_code = 405
    headers = {"Allow": "POST"}


class InferRoute:
    """ASGI: the infer paths answered here, everything else passed to `app`."""

    #: (method, path) of the routes served here, in Starlette's path syntax.
    routes = [("POST", _PREFIX + "{model}" + _SUFFIX), ("POST", _PREFIX + "{model}/versions/{version}" + _SUFFIX)]

    def __init__(
        self,
        app: Any,
        dataplane: Dataplane,
        max_request_bytes: int,
        max_json_bytes: int,
        error_response: Callable[[Request, Exception], Awaitable[Response]],
    ):
        self.app = app
        self.state = app.state
        self.dp = dataplane
        self.max_request_bytes = max_request_bytes
        self.max_json_bytes = max_json_bytes
        self._error_response = error_response

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (path := scope["path"]).startswith(_PREFIX) or not path.endswith(_SUFFIX):
            return await self.app(scope, receive, send)
        parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
        if len(parts) == 1 and parts[0]:
            version = None
        elif len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
            version = parts[2]
        else:
            return await self.app(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {path}: use POST")
            result, header_length = await self._infer(scope, receive, parts[0], version)
        except Exception as err:  # noqa: BLE001 (the app's JSON error answer, as for every route)
            response = await self._error_response(Request(scope), err)
            return await response(scope, receive, send)
        headers = [(b"content-length", b"%d" % len(result))]
        if header_length is None:
            headers.append(_JSON)
        else:
            headers += [_BINARY, (_HEADER_LENGTH, b"%d" % header_length)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": result})

    async def _infer(self, scope: dict, receive: Any, name: str, version: str | None) -> tuple[bytes, int | None]:
        if version is not None:  # before reading a body for nothing (the dataplane checks again once it has it)
            self.dp.check_version(name, version)
        length = header_length = encoding = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == _HEADER_LENGTH:
                header_length = value
            elif key == b"content-encoding":
                encoding = value.decode("latin-1").lower()
        # JSON costs more memory and time per byte than binary tensors: a lower cap on it.
        if header_length is None:
            limit = self.max_json_bytes
        elif header_length.isdigit() and int(header_length) > self.max_json_bytes:
            raise RequestTooLarge(f"the JSON part of the request exceeds the limit of {self.max_json_bytes} bytes")
        else:
            limit = self.max_request_bytes
        body = await read_body(receive, length, limit)
        if encoding is not None and encoding != "identity":
            body = await self.dp.run_blocking(_decompress, body, encoding, limit)
        return await self.dp.infer(name, body, header_length, version)


async def read_body(receive: Any, declared: bytes | None, limit: int) -> bytes | bytearray:
    """The whole request body, at most `limit` bytes; a client that hangs up is a client error."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body of {declared.decode()} bytes exceeds the limit of {limit}")
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body = message.get("body", b"")  # the common case: the whole body in one message
    else:
        body = bytearray()  # grown in place: a list of parts and their join would hold the body twice
        while True:
            if message["type"] != "http.request":
                raise InvalidInputError("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
            body += chunk
            if not message.get("more_body", False):
                break
            message = await receive()
    if len(body) > limit:
        raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
    return body


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo `Content-Encoding: gzip|deflate` (tritonclient's request compression), at most `limit` bytes."""
    if encoding not in ("gzip", "deflate"):
        raise InvalidInputError(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        result = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise InvalidInputError(f"request body is not valid {encoding} data: {err}") from err
    if len(result) > limit:
        raise RequestTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidInputError(f"request body is truncated {encoding} data")
    return result
