"""Thin Starlette routes of the Open Inference Protocol (V2) and the store extensions.

Each route reads what HTTP gives (raw body, headers, path), calls the dataplane and wraps the
answer. Bodies are read raw: tritonclient sends no Content-Type. Every `ArachneError` becomes
`{"error": message}` with its status in one handler. Infer itself is answered in front of
Starlette, by `infer_route.InferRoute`, with the same error handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.server.auth import HOW_TO_AUTHENTICATE, bearer_matches
from arachne_mlflow.server.capture.routes import capture_routes
from arachne_mlflow.server.dataplane import Dataplane
from arachne_mlflow.server.infer_route import InferRoute, read_body
from arachne_mlflow.server.records import MAX_PROVENANCE_BYTES, check_provenance
from arachne_mlflow.server.settings import ServerSettings
from arachne_mlflow.server.signatures import SignaturePolicy
from arachne_mlflow.server.store import ModelStore

_logger = logging.getLogger(__name__)

PROVENANCE_HEADER = "Arachne-Provenance"
_PUBLIC_PREFIX = "/v2/health/"
# Running out of file descriptors (connections, uploads) is the server being full, not broken.
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
T = TypeVar("T")


def create_app(settings: ServerSettings | str, **options: Any) -> ASGIApp:
    """The device server application with `settings` (server/settings.py), or over the model store
    directory `settings` with `options` as the other settings' values.

    Layers, outermost first: bearer auth (with a token), `InferRoute` (the infer paths), Starlette.
    The lifespan starts and stops the dataplane and, with `grpc_port`, the gRPC service beside it
    on the same event loop.
    """
    if not isinstance(settings, ServerSettings):
        settings = ServerSettings(str(settings), **options)
    elif options:
        raise TypeError("create_app takes ServerSettings or a store directory with options, not both")
    # (the batching policy is serving's: the store asks it at each load, the dataplane reads what it decided)
    store = ModelStore(
        settings.model_store,
        settings.max_upload_bytes,
        serving=settings.batching.settings_for,
        signatures=SignaturePolicy(settings.trust_keys),
    )
    dataplane = Dataplane(store, settings)
    routes = _Routes(dataplane, settings.max_json_bytes)
    if settings.grpc_port is not None:
        from arachne_mlflow.server.grpc_service import GrpcServer  # the grpc extra, checked now

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await dataplane.start()
        grpc_server = None
        try:
            if settings.grpc_port is not None:
                grpc_server = await GrpcServer.from_settings(dataplane, settings)
                app.state.grpc_port = grpc_server.port
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.grpc_grace)
            await dataplane.close()

    app = Starlette(
        routes=routes.table(),
        lifespan=lifespan,
        exception_handlers={
            ArachneError: routes.on_error,
            HTTPException: routes.on_http_error,
            Exception: routes.on_crash,
        },
    )
    app.state.dataplane = dataplane
    front = InferRoute(app, dataplane, settings.max_request_bytes, settings.max_json_bytes, routes.error_response)
    return _BearerAuth(front, settings.token, dataplane) if settings.token else front


class _Routes:
    """The route handlers: HTTP in, dataplane call, HTTP out."""

    def __init__(self, dataplane: Dataplane, max_json_bytes: int):
        self.dp = dataplane
        self.repo = dataplane.repository
        self.max_json_bytes = max_json_bytes  # the routes here take small JSON bodies (infer is InferRoute's)

    def table(self) -> list[Route]:
        m = "/v2/models/{model}"
        v = m + "/versions/{version}"
        r = "/v2/repository/models/{model}"
        return [  # (infer is answered in front of these: InferRoute)
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/v2", self.server_metadata),
            Route("/v2/models/stats", self.statistics),  # before {model}: Triton's path for every model's
            Route(m, self.model_metadata),
            Route(v, self.model_metadata),
            Route(m + "/ready", self.model_ready),
            Route(v + "/ready", self.model_ready),
            Route(m + "/config", self.model_config),
            Route(v + "/config", self.model_config),
            Route(m + "/stats", self.statistics),
            Route(v + "/stats", self.statistics),
            Route(m + "/benchmark", self.benchmark, methods=["POST"]),
            Route("/v2/repository/index", self.index, methods=["POST"]),
            Route(r + "/load", self.load, methods=["POST"]),
            Route(r + "/unload", self.unload, methods=["POST"]),
            Route(r + "/rollback", self.rollback, methods=["POST"]),
            Route(r, self.model_record, methods=["GET"]),
            Route(r, self.upload, methods=["PUT"]),
            Route(r, self.delete, methods=["DELETE"]),
            Route("/metrics", self.metrics),
            *capture_routes(self.dp.capture, self.dp.run_blocking),
        ]

    # -- V2 --------------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"ready": self.dp.ready}, status_code=200 if self.dp.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(await self.dp.run_blocking(self.dp.server_metadata))

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(self.dp.model_metadata(self._model(request)))

    async def model_ready(self, request: Request) -> Response:
        return JSONResponse(self.dp.model_ready(self._model(request)))

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(self.dp.model_config(self._model(request)))

    async def statistics(self, request: Request) -> Response:
        name = self._model(request) if "model" in request.path_params else None
        return JSONResponse(self.dp.statistics(name))

    async def index(self, request: Request) -> Response:
        options = await self._json(request)
        return JSONResponse(self.repo.index(ready_only=bool(options.get("ready"))))

    async def load(self, request: Request) -> Response:
        parameters = (await self._json(request)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInputError("'parameters' must be an object")
        self.repo.check_load_parameters(parameters)
        await self.repo.load(request.path_params["model"])
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        await self.repo.unload(request.path_params["model"])
        return JSONResponse({})

    # -- extensions ------------------------------------------------------------------------
    async def model_record(self, request: Request) -> Response:
        return JSONResponse(self.repo.record(request.path_params["model"]))

    async def upload(self, request: Request) -> Response:
        body = _Body(request)
        try:
            provenance = _parse_provenance(request.headers.get(PROVENANCE_HEADER))
            response = JSONResponse(await self.repo.upload(request.path_params["model"], body.chunks(), provenance))
        except Exception as err:  # noqa: BLE001 (answered as every error is; then the connection is closed)
            response = await self.error_response(request, err)
        if not body.complete:  # a refused upload is not read further: answer at once, then hang up
            response.headers["Connection"] = "close"
        return response

    async def rollback(self, request: Request) -> Response:
        return JSONResponse(await self.repo.rollback(request.path_params["model"]))

    async def delete(self, request: Request) -> Response:
        await self.repo.delete(request.path_params["model"])
        return JSONResponse({})

    async def benchmark(self, request: Request) -> Response:
        options = await self._json(request)
        work = self.dp.benchmark(request.path_params["model"], options)
        return JSONResponse(await _unless_client_leaves(request, work))

    async def metrics(self, request: Request) -> Response:
        return Response(self.dp.metrics.render(), media_type=self.dp.metrics.content_type)

    # -- errors ----------------------------------------------------------------------------
    async def error_response(self, request: Request, err: Exception) -> Response:
        """The answer to any exception (for routes answered outside Starlette's handlers)."""
        if isinstance(err, ArachneError):
            return await self.on_error(request, err)
        if isinstance(err, HTTPException):
            return await self.on_http_error(request, err)
        return await self.on_crash(request, err)

    async def on_error(self, request: Request, err: Exception) -> Response:
        status = getattr(err, "status_code", 500)
        _logger.info("%s %s: %d %s", request.method, request.url.path, status, err)  # (no access log by default)
        self.dp.metrics.http_errors.labels(str(status)).inc()
        return JSONResponse({"error": str(err)}, status_code=status, headers=getattr(err, "headers", None))

    async def on_http_error(self, request: Request, err: HTTPException) -> Response:
        self.dp.metrics.http_errors.labels(str(err.status_code)).inc()
        return JSONResponse({"error": err.detail}, status_code=err.status_code, headers=err.headers)

    async def on_crash(self, request: Request, err: Exception) -> Response:
        if isinstance(err, OSError) and err.errno in _EXHAUSTED:
            _logger.error("%s %s: %s", request.method, request.url.path, err)
            self.dp.metrics.http_errors.labels("503").inc()
            message = f"the server is out of file descriptors ({err.strerror}): try again later"
            return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "1"})
        _logger.exception("unexpected error on %s %s", request.method, request.url.path)
        self.dp.metrics.http_errors.labels("500").inc()
        return JSONResponse({"error": f"internal server error: {type(err).__name__}: {err}"}, status_code=500)

    # -- helpers ---------------------------------------------------------------------------
    def _model(self, request: Request) -> str:
        """The model named in the path; a `/versions/{v}` path must name the served version."""
        name = request.path_params["model"]
        if "version" in request.path_params:
            self.dp.check_version(name, request.path_params["version"])
        return name

    async def _body(self, request: Request) -> bytes | bytearray:
        return await read_body(
            request.receive, request.headers.get("content-length", "").encode("latin-1") or None, self.max_json_bytes
        )

    async def _json(self, request: Request) -> dict[str, Any]:
        """An optional JSON object body (tritonclient sends none, or `{}`)."""
        body = await self._body(request)
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise InvalidInputError(f"request body is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise InvalidInputError("request body must be a JSON object")
        return data


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, which is cancelled if the client disconnects first."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise InvalidInputError("the client disconnected before the answer was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up (the body has been read: nothing else comes before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Body:
    """A request body read as it arrives, knowing whether it was read to its end."""

    def __init__(self, request: Request):
        self._request = request
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks; a client that hangs up is a client error, not a crash."""
        try:
            async for chunk in self._request.stream():
                self.complete = not chunk  # Starlette ends a body with b""
                yield chunk
        except ClientDisconnect as err:
            raise InvalidInputError("the client disconnected before sending the whole body") from err


def _parse_provenance(text: str | None) -> dict[str, Any] | None:
    """Where the model came from (model URI, registered model name, version, run id): a small JSON object
    of finite values, checked before anything of the upload is written."""
    if text is None:
        return None
    if len(text) > MAX_PROVENANCE_BYTES:
        raise InvalidInputError(f"{PROVENANCE_HEADER} is longer than {MAX_PROVENANCE_BYTES} bytes")
    try:
        provenance = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InvalidInputError(f"{PROVENANCE_HEADER} is not valid JSON: {err}") from err
    return check_provenance(provenance, PROVENANCE_HEADER)


class _BearerAuth:
    """ASGI middleware: every HTTP route but /v2/health/* needs `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str, dataplane: Dataplane):
        self.app = app
        self.state = app.state
        self._token = token.encode()
        self._dataplane = dataplane

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(_PUBLIC_PREFIX):
            if not bearer_matches(dict(scope["headers"]).get(b"authorization"), self._token):
                self._dataplane.metrics.http_errors.labels("401").inc()
                response = JSONResponse(
                    {"error": HOW_TO_AUTHENTICATE},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
