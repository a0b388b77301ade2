"""`ModelStreamInfer` for ordinary (non-decoupled) models: one answer per request, in the order sent.

What `tritonclient.grpc`'s `start_stream` / `async_stream_infer` and `perf_analyzer --streaming`
use. Each message on the stream is a `ModelInferRequest`, parsed within the same bounds as a
`ModelInfer` call's and answered by the same `infer` (the servicer's, tensors in shared memory
regions included); a request that fails is answered with its `error_message` and the stream goes
on. Requests run concurrently, answers leave in order.

Bounds: at most `max_in_flight` requests of one stream are read and not yet answered (the next
message is read only once a slot is free, so what a client sends beyond them waits in gRPC's flow
control, not in the server); the caller checks the token before the first message is read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from arachne_mlflow.errors import ArachneError
from arachne_mlflow.protocol.grpc import inference_pb2 as pb
from arachne_mlflow.server.dataplane import Dataplane

_logger = logging.getLogger(__name__)


class InferStream:
    """Serves one stream at a time per call: `await stream(context)` until the client half-closes."""

    def __init__(
        self,
        dataplane: Dataplane,
        parse: Callable[[bytes], Any],
        infer: Callable[[pb.ModelInferRequest], Awaitable[pb.ModelInferResponse]],
        max_in_flight: int,
        status_code: Callable[[ArachneError], grpc.StatusCode],
    ):
        self.dp = dataplane
        self.parse = parse
        self.infer = infer
        self.max_in_flight = max_in_flight
        self.status_code = status_code

    async def __call__(self, context: Any) -> None:
        slots = asyncio.Semaphore(self.max_in_flight)
        pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(context, slots, pending))
        try:
            while (answer := await pending.get()) is not None:
                await context.write(await answer)
                slots.release()
            await reader  # (its error, if reading failed)
        finally:
            reader.cancel()
            while not pending.empty():
                if (left := pending.get_nowait()) is not None:
                    left.cancel()

    async def _read(self, context: Any, slots: asyncio.Semaphore, pending: asyncio.Queue) -> None:
        """Read messages while a slot is free, starting each request as it comes."""
        try:
            while True:
                await slots.acquire()
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                pending.put_nowait(asyncio.ensure_future(self._answer(raw)))
        finally:
            pending.put_nowait(None)

    async def _answer(self, raw: bytes) -> pb.ModelStreamInferResponse:
        """One request's answer on the stream: its response, or its error in `error_message`."""
        try:
            response = await self.infer(self.parse(raw))
            return pb.ModelStreamInferResponse(infer_response=response)
        except ArachneError as err:
            self.dp.metrics.grpc_errors.labels(self.status_code(err).name).inc()
            return pb.ModelStreamInferResponse(error_message=str(err))
        except Exception as err:
            _logger.exception("unexpected error in a gRPC ModelStreamInfer request")
            self.dp.metrics.grpc_errors.labels(grpc.StatusCode.INTERNAL.name).inc()
            return pb.ModelStreamInferResponse(error_message=f"internal server error: {type(err).__name__}: {err}")
