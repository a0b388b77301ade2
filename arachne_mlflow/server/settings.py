"""The device server's settings: one frozen object, built once (server/main.py, from flags and the
environment) and handed to the app, the dataplane, the store and the gRPC server.

Nothing here imports a web framework, gRPC or pull mode: those are named for type checkers only,
so that a server without `--grpc-port` or `--follow` never loads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from arachne_mlflow.server.batching import BatchingPolicy

if TYPE_CHECKING:
    from arachne_mlflow.model.signing import TrustedKey
    from arachne_mlflow.server.grpc_service import ConnectionLimits
    from arachne_mlflow.server.pull.follow import FollowConfig

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_MAX_REQUEST_BYTES = 1024**3
DEFAULT_MAX_JSON_BYTES = 64 * 1024**2
DEFAULT_BENCHMARK_SECONDS = 30.0
DEFAULT_SHM_MAX_BYTES = 1024**3


@dataclass(frozen=True)
class ServerSettings:
    """What a device server runs with.

    `batching` says which models batch their requests (`--batching`; default: those whose MLmodel
    asks). With `grpc_port` (0: any free port, then in `app.state.grpc_port`), the gRPC service
    runs beside REST on the same event loop; `grpc_tls` is (certificate file, key file),
    `grpc_grace` the seconds calls may take to finish at shut-down, `grpc_limits` its
    `ConnectionLimits`. With `follow`, models follow registry aliases (server/pull/). With
    `trust_keys`, only models signed by one of them are installed, rolled back to or loaded (server/signatures.py).
    With `shm_regions` above 0, loopback clients may register that many system shared memory regions,
    of `shm_max_bytes` in all (server/shared_memory.py).
    """

    model_store: str
    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES  # at most `max_request_bytes` (a JSON body is a request body)
    max_workers: int | None = None
    benchmark_seconds: float = DEFAULT_BENCHMARK_SECONDS
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    grpc_tls: tuple[str, str] | None = None
    grpc_grace: float = 5.0
    grpc_limits: ConnectionLimits | None = None
    follow: FollowConfig | None = None
    trust_keys: tuple[TrustedKey, ...] = ()  # `--trust-key`: every installed version must be signed by one
    shm_regions: int = 0  # `--shm-regions`: 0 = the shared memory extension is off
    shm_max_bytes: int = DEFAULT_SHM_MAX_BYTES
    device_name: str | None = None  # `--device-name`: how its records and field samples name it (None: host name)

    def __post_init__(self) -> None:
        # (`create_app`'s keywords may leave these out as None: the defaults then)
        if self.max_upload_bytes is None:
            object.__setattr__(self, "max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)
        if self.batching is None:
            object.__setattr__(self, "batching", BatchingPolicy())
        object.__setattr__(self, "max_json_bytes", min(self.max_json_bytes, self.max_request_bytes))
