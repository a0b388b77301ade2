"""The capture routes: a model's rules on this device, and its spool's closed segments for delivery.

    GET    /v2/repository/models/{model}/capture      the rules in force and their source
    PUT    /v2/repository/models/{model}/capture      set the device's rules (a JSON object; {} = off)
    DELETE /v2/repository/models/{model}/capture      forget them: the MLmodel's rules apply again
    GET    /v2/capture/{model}/segments               closed segments, oldest first, with sizes
    GET    /v2/capture/{model}/segments/{segment}     one closed segment's bytes
    DELETE /v2/capture/{model}/segments/{segment}     delete one (once delivered)
    POST   /v2/capture/{model}/rollover               close the open segment now

Every route sits behind the server's bearer token like the others. Segment names are allow-listed
(`seg-<12 digits>.cap`) and model names checked before any path is built; a rules body is read
within `MAX_RULES_BODY` bytes and parsed by protocol/bounded_json.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from arachne_mlflow.model.names import check_name
from arachne_mlflow.protocol import bounded_json
from arachne_mlflow.protocol.capture_format import segment_sequence
from arachne_mlflow.server.capture.manager import Capture
from arachne_mlflow.server.infer_route import read_body

MAX_RULES_BODY = 16 * 1024
RunBlocking = Callable[..., Awaitable[Any]]


def capture_routes(capture: Capture, run_blocking: RunBlocking) -> list[Route]:
    """The routes over `capture`; file work runs through `run_blocking`."""
    handlers = _Handlers(capture, run_blocking)
    rules = "/v2/repository/models/{model}/capture"
    segments = "/v2/capture/{model}/segments"
    return [
        Route(rules, handlers.get_rules, methods=["GET"]),
        Route(rules, handlers.put_rules, methods=["PUT"]),
        Route(rules, handlers.delete_rules, methods=["DELETE"]),
        Route(segments, handlers.list_segments, methods=["GET"]),
        Route(segments + "/{segment}", handlers.get_segment, methods=["GET"]),
        Route(segments + "/{segment}", handlers.delete_segment, methods=["DELETE"]),
        Route("/v2/capture/{model}/rollover", handlers.rollover, methods=["POST"]),
    ]


class _Handlers:
    def __init__(self, capture: Capture, run_blocking: RunBlocking) -> None:
        self.capture = capture
        self.run = run_blocking

    async def get_rules(self, request: Request) -> Response:
        return JSONResponse(self.capture.rules(_model(request)))

    async def put_rules(self, request: Request) -> Response:
        name = _model(request)
        length = request.headers.get("content-length", "").encode("latin-1") or None
        body = await read_body(request.receive, length, MAX_RULES_BODY)
        data = bounded_json.loads(body, "capture rules", max_bytes=MAX_RULES_BODY, max_containers=16)
        return JSONResponse(await self.run(self.capture.set_rules, name, data))

    async def delete_rules(self, request: Request) -> Response:
        return JSONResponse(await self.run(self.capture.clear_rules, _model(request)))

    async def list_segments(self, request: Request) -> Response:
        name = _model(request)
        return JSONResponse({"model": name, "segments": await self.run(self.capture.segments, name)})

    async def get_segment(self, request: Request) -> Response:
        name, segment = _model(request), _segment(request)
        path = await self.run(self.capture.segment_path, name, segment)
        return FileResponse(path, media_type="application/octet-stream", filename=segment)

    async def delete_segment(self, request: Request) -> Response:
        await self.run(self.capture.delete_segment, _model(request), _segment(request))
        return JSONResponse({})

    async def rollover(self, request: Request) -> Response:
        return JSONResponse({"closed": await self.run(self.capture.rollover, _model(request))})


def _model(request: Request) -> str:
    return check_name(request.path_params["model"])


def _segment(request: Request) -> str:
    segment = request.path_params["segment"]
    segment_sequence(segment)  # allow-listed before any path is built
    return segment
