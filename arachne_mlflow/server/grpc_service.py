"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, as thin as the REST routes.

Triton's superset of KServe's service (the same package and service name), so `tritonclient.grpc`
and KServe's client both work. Each RPC reads its message, calls the dataplane and wraps the
answer: the same dataplane, bearer token, size limit and errors as REST, an `ArachneError`
becoming the gRPC status of its HTTP status. It runs as a `grpc.aio` server on the event loop of
the HTTP server (started and stopped in the app's lifespan), so both share the dataplane's
thread pool and its per-model state without locks.

Needs the `grpc` extra (grpcio, protobuf).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import (
    ArachneError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    ModelNotReadyError,
)

try:
    import grpc
    from google.protobuf import json_format
    from google.protobuf.message import DecodeError

    from arachne_mlflow.protocol.grpc import codec as grpc_codec
    from arachne_mlflow.protocol.grpc import inference_pb2 as pb
    from arachne_mlflow.protocol.grpc import shared_memory as grpc_shm
    from arachne_mlflow.protocol.grpc.wire import check_parse_cost
except ImportError as err:  # pragma: no cover (CI installs the extra)
    raise MissingDependencyError("--grpc-port needs gRPC: pip install 'arachne-mlflow[grpc]'") from err

from arachne_mlflow.server.auth import HOW_TO_AUTHENTICATE, bearer_matches
from arachne_mlflow.server.dataplane import Dataplane
from arachne_mlflow.server.grpc_stream import InferStream
from arachne_mlflow.server.settings import ServerSettings
from arachne_mlflow.server.shared_memory_grpc import SharedMemoryRpcs

_logger = logging.getLogger(__name__)

#: The service's name on the wire (Triton's and KServe's), whatever our proto package is called.
SERVICE = "inference.GRPCInferenceService"
#: RPCs answered without a token, like REST's /v2/health/*.
PUBLIC = frozenset({"ServerLive", "ServerReady"})
#: gRPC's largest message length option (a C int).
_GRPC_MAX_LENGTH = 2**31 - 1
#: Streams one connection may have open at once (each can hold a message up to the size limit); also
#: the requests one ModelStreamInfer stream may have read and not yet answered.
MAX_CONCURRENT_STREAMS = 100
#: The flow-control window of a stream no handler reads: what a peer can park in a stream it never
#: completes. A call being read gets the window its message needs, whatever this is.
STREAM_WINDOW = 16 * 1024
# The gRPC status of each HTTP status an ArachneError carries; anything else is INTERNAL.
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(err: ArachneError) -> grpc.StatusCode:
    """The gRPC status an `ArachneError` is answered with (by its HTTP status)."""
    return _STATUS.get(getattr(err, "status_code", 500), grpc.StatusCode.INTERNAL)


class InferenceServicer(SharedMemoryRpcs):
    """The RPCs, named as in the service; each is `async (request, context) -> response` (the shared
    memory ones in server/shared_memory_grpc.py)."""

    def __init__(self, dataplane: Dataplane):
        self.dp = dataplane

    # -- health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dp.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        """Unknown and unloaded models are not ready (Triton answers so, rather than with an error)."""
        try:
            self._check_version(request.name, request.version)
            self.dp.model_ready(request.name)
        except (ModelNotFoundError, ModelNotReadyError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return _message(await self.dp.run_blocking(self.dp.server_metadata), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        self._check_version(request.name, request.version)
        return _message(self.dp.model_metadata(request.name), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        self._check_version(request.name, request.version)
        return _message({"config": self.dp.model_config(request.name)}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            self._check_version(request.name, request.version)
        return _message(self.dp.statistics(request.name or None), pb.ModelStatisticsResponse())

    # -- inference ---------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        self._check_version(request.model_name, request.model_version)  # (and again on the model taken)
        return await self.infer(request)

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """A `ModelInferRequest` answered (ModelInfer's and each ModelStreamInfer message's): by the
        shared memory codec where a tensor names a region, else by the plain one."""
        decode, encode, size = grpc_codec.decode_request, grpc_codec.encode_response, request.ByteSize()
        if grpc_shm.names_region(request):
            decode, encode, size = self.shared_memory_codec(request)
        return await self.dp.infer_message(
            request.model_name, request, decode, encode, request.model_version or None, size
        )

    # -- repository --------------------------------------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        return _message({"models": self.dp.repository.index(ready_only=request.ready)}, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:
        name = request.model_name or request.repository_name  # KServe's client sends the name in field 1
        self.dp.repository.check_load_parameters(dict(request.parameters))
        await self.dp.repository.load(name)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:
        name = request.model_name or request.repository_name
        await self.dp.repository.unload(name)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)

    def _check_version(self, name: str, version: str) -> None:
        if version:
            self.dp.check_version(name, version)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one gRPC peer may hold: connections that stay open past these bounds are closed."""

    #: Connections open at once; beyond it new ones are closed at once (descriptors stay for REST).
    max_connections: int = 256
    #: Seconds a connection with no call in progress stays open.
    idle_timeout: float = 30.0
    #: Seconds a new connection has to complete the HTTP/2 (and TLS) handshake.
    handshake_timeout: float = 5.0

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout * 1000)),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout * 1000)),
        ]


class GrpcServer:
    """A `grpc.aio` server of the service on one address, in the running event loop."""

    def __init__(self, server: Any, port: int):
        self._server = server
        self.port = port

    @classmethod
    async def from_settings(cls, dataplane: Dataplane, settings: ServerSettings) -> GrpcServer:
        """Serve with the server's settings: its `grpc_*` ones, its token and its request cap."""
        tls = None
        if settings.grpc_tls is not None:
            tls = (Path(settings.grpc_tls[0]).read_bytes(), Path(settings.grpc_tls[1]).read_bytes())
        return await cls.start(
            dataplane,
            settings.grpc_host,
            settings.grpc_port or 0,
            settings.token,
            settings.max_request_bytes,
            tls,
            settings.grpc_limits,
        )

    @classmethod
    async def start(
        cls,
        dataplane: Dataplane,
        host: str,
        port: int,
        token: str | None = None,
        max_message_bytes: int = _GRPC_MAX_LENGTH,
        tls: tuple[bytes, bytes] | None = None,
        limits: ConnectionLimits | None = None,
    ) -> GrpcServer:
        """Serve on `host:port` (0: a free port); `tls` is (certificate chain, private key) in PEM."""
        max_message_bytes = min(max_message_bytes, _GRPC_MAX_LENGTH)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
                ("grpc.so_reuseport", 0),
                # Windows stay at STREAM_WINDOW: bandwidth-delay probing would grow every stream's
                # (and the transport's read buffers) to megabytes for a peer that never sends a token.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW),
                *(limits or ConnectionLimits()).options(),
            ]
        )
        servicer = InferenceServicer(dataplane)
        server.add_generic_rpc_handlers((_handlers(servicer, dataplane, token, max_message_bytes),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls is None:
                bound = server.add_insecure_port(address)
            else:
                certificate, key = tls
                bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, certificate)]))
        except RuntimeError as err:  # grpcio's "Failed to bind" (the port is taken, the host is not ours)
            bound, cause = 0, err
        else:
            cause = None
        if not bound:
            raise InvalidInputError(f"cannot serve gRPC on {address}: {cause or 'the address cannot be bound'}")
        await server.start()
        return cls(server, bound)

    async def stop(self, grace: float) -> None:
        """Stop taking calls and let those running finish for up to `grace` seconds."""
        await self._server.stop(grace)


def _handlers(servicer: InferenceServicer, dataplane: Dataplane, token: str | None, max_message_bytes: int) -> Any:
    """The generic handler of every RPC the servicer has, each wrapped in auth and error mapping.

    Registered by hand under the wire name `SERVICE`, so our proto package (renamed, see the
    .proto) does not show, and no generated `_pb2_grpc` module (with its own version pin) is needed.
    Each is registered as request-streaming, though clients send one message: grpc.aio reads a
    unary request into memory before its handler runs, a streaming one only when the handler asks,
    so the token is checked before a byte of the message is kept.
    """
    expected = token.encode() if token else None
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        parse = _parser(getattr(pb, method.input_type.name), max_message_bytes)
        if method.name == "ModelStreamInfer":  # the one bidirectional RPC (server/grpc_stream.py)
            stream = InferStream(dataplane, parse, servicer.infer, MAX_CONCURRENT_STREAMS, status_code)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _guarded_stream(stream, dataplane, expected), request_deserializer=None, response_serializer=_serialize
            )
            continue
        handlers[method.name] = grpc.stream_unary_rpc_method_handler(
            _guarded(method.name, getattr(servicer, method.name), dataplane, expected, parse),
            request_deserializer=None,  # (raw bytes: checked, then parsed, by `parse`)
            response_serializer=_serialize,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _parser(message_class: Any, max_bytes: int) -> Callable[[bytes], Any]:
    """A message's parser that first refuses what would cost more than `max_bytes` once parsed."""

    def parse(raw: bytes) -> Any:
        check_parse_cost(raw, message_class.DESCRIPTOR, max_bytes)
        try:
            return message_class.FromString(raw)
        except DecodeError as err:
            raise InvalidInputError(f"the request is not a well-formed {message_class.__name__}: {err}") from err

    return parse


def _guarded(
    name: str,
    call: Callable[[Any, Any], Awaitable[Any]],
    dataplane: Dataplane,
    token: bytes | None,
    parse: Callable[[bytes], Any],
) -> Callable[[Any, Any], Awaitable[Any]]:
    """`call` behind the bearer token (unless public), checked before the message is read; its
    errors answered as gRPC statuses."""
    needs_token = token is not None and name not in PUBLIC

    async def guarded(requests: Any, context: Any) -> Any:
        if needs_token and not bearer_matches(_authorization(context), token):
            return await _abort(context, dataplane, grpc.StatusCode.UNAUTHENTICATED, HOW_TO_AUTHENTICATE)
        try:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                raise InvalidInputError(f"the {name} call carries no request message")
            return await call(parse(raw), context)
        except ArachneError as err:
            return await _abort(context, dataplane, status_code(err), str(err))
        except Exception as err:
            if isinstance(err, grpc.aio.AbortError):  # context.abort() inside the call: already answered
                raise
            _logger.exception("unexpected error in gRPC %s", name)
            message = f"internal server error: {type(err).__name__}: {err}"
            return await _abort(context, dataplane, grpc.StatusCode.INTERNAL, message)

    return guarded


def _guarded_stream(
    stream: InferStream, dataplane: Dataplane, token: bytes | None
) -> Callable[[Any, Any], Awaitable[None]]:
    """The stream behind the bearer token, checked before its first message is read; a stream's
    requests are each answered (errors in `error_message`), so only the token ends one with a status."""

    async def guarded(requests: Any, context: Any) -> None:
        if token is not None and not bearer_matches(_authorization(context), token):
            return await _abort(context, dataplane, grpc.StatusCode.UNAUTHENTICATED, HOW_TO_AUTHENTICATE)
        await stream(context)

    return guarded


async def _abort(context: Any, dataplane: Dataplane, code: grpc.StatusCode, message: str) -> Any:
    dataplane.metrics.grpc_errors.labels(code.name).inc()
    await context.abort(code, message)


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":  # gRPC metadata keys are lowercase on the wire
            return value
    return None


def _message(data: dict[str, Any], message: Any) -> Any:
    """A response message filled from the dataplane's dict (fields it does not have are left out)."""
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()
