"""The REST routes of the shared memory extensions (Triton's paths), as thin as app.py's.

System shared memory: `GET /v2/systemsharedmemory[/region/{region}]/status`,
`POST /v2/systemsharedmemory/region/{region}/register` (`{"key", "offset", "byte_size"}`),
`POST /v2/systemsharedmemory[/region/{region}]/unregister`. CUDA shared memory has no regions on
this server: its status is empty, unregistering does nothing and registering is refused (Triton's
example clients unregister both kinds before they start).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.server.shared_memory import SharedMemoryRegistry

ReadJson = Callable[[Request], Awaitable[dict[str, Any]]]
_SYSTEM = "/v2/systemsharedmemory"
_CUDA = "/v2/cudasharedmemory"


def shared_memory_routes(registry: SharedMemoryRegistry, read_json: ReadJson) -> list[Route]:
    """The routes over `registry`; `read_json` reads a small JSON object body (app.py's)."""

    async def status(request: Request) -> Response:
        registry.check_enabled()
        return JSONResponse(registry.status(request.path_params.get("region")))

    async def register(request: Request) -> Response:
        registry.check_allowed(_peer(request))  # before the body is read
        body = await read_json(request)
        registry.register(
            request.path_params["region"], body.get("key"), body.get("offset", 0), body.get("byte_size"), _peer(request)
        )
        return JSONResponse({})

    async def unregister(request: Request) -> Response:
        registry.check_allowed(_peer(request))
        registry.unregister(request.path_params.get("region"))
        return JSONResponse({})

    async def cuda_status(request: Request) -> Response:
        if "region" in request.path_params:
            raise InvalidInputError(f"no CUDA shared memory region named {request.path_params['region']!r}")
        return JSONResponse([])

    async def cuda_register(request: Request) -> Response:
        raise InvalidInputError("CUDA shared memory is not supported on this server; use system shared memory")

    async def cuda_unregister(request: Request) -> Response:
        return JSONResponse({})

    region = "/region/{region}"
    return [
        Route(_SYSTEM + "/status", status),
        Route(_SYSTEM + region + "/status", status),
        Route(_SYSTEM + region + "/register", register, methods=["POST"]),
        Route(_SYSTEM + "/unregister", unregister, methods=["POST"]),
        Route(_SYSTEM + region + "/unregister", unregister, methods=["POST"]),
        Route(_CUDA + "/status", cuda_status),
        Route(_CUDA + region + "/status", cuda_status),
        Route(_CUDA + region + "/register", cuda_register, methods=["POST"]),
        Route(_CUDA + "/unregister", cuda_unregister, methods=["POST"]),
        Route(_CUDA + region + "/unregister", cuda_unregister, methods=["POST"]),
    ]


def _peer(request: Request) -> str | None:
    return request.client.host if request.client is not None else None
