"""The gRPC RPCs of the shared memory extensions (Triton's), mixed into `grpc_service.InferenceServicer`.

The same registry, checks and errors as the REST routes (server/shared_memory_routes.py); the
peer that registers or unregisters must be on this machine. Needs the `grpc` extra.
"""

from __future__ import annotations

from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.grpc import inference_pb2 as pb
from arachne_mlflow.protocol.grpc import shared_memory as grpc_shm
from arachne_mlflow.server.shared_memory import SharedMemoryRegistry, grpc_peer_host


class SharedMemoryRpcs:
    """System shared memory Status/Register/Unregister, and CUDA's (no regions here)."""

    dp: Any  # the servicer's Dataplane

    @property
    def _regions(self) -> SharedMemoryRegistry:
        return self.dp.shared_memory

    def shared_memory_codec(self, request: pb.ModelInferRequest) -> tuple[Any, Any, int]:
        """(decode, encode, size) for an infer request whose tensors name regions."""
        self._regions.check_enabled()
        return grpc_shm.decoder(self._regions), grpc_shm.encoder(self._regions), grpc_shm.request_size(request)

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> pb.SystemSharedMemoryStatusResponse:
        self._regions.check_enabled()
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions.status(request.name or None):
            response.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> pb.SystemSharedMemoryRegisterResponse:
        peer = grpc_peer_host(context.peer())
        self._regions.register(request.name, request.key, request.offset, request.byte_size, peer)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions.check_allowed(grpc_peer_host(context.peer()))
        self._regions.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise InvalidInputError(f"no CUDA shared memory region named {request.name!r}")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> pb.CudaSharedMemoryRegisterResponse:
        raise InvalidInputError("CUDA shared memory is not supported on this server; use system shared memory")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()
