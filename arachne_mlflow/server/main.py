"""Command-line start of the device server, shared by `arachne-mlflow serve` and `python -m`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import resource
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arachne_mlflow.server.settings import ServerSettings

_logger = logging.getLogger("arachne_mlflow.server")

DEFAULT_STORE = Path("~/.arachne-mlflow/model-store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=5051)
    parser.add_argument(
        "--model-store",
        default=os.environ.get("ARACHNE_MODEL_STORE", str(DEFAULT_STORE)),
        help=f"directory that keeps the models (default $ARACHNE_MODEL_STORE or {DEFAULT_STORE})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("ARACHNE_TOKEN"),
        help="bearer token every route but health requires (default $ARACHNE_TOKEN; none: no auth)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve the protocol over gRPC on this port, same host, token and TLS (needs arachne-mlflow[grpc])",
    )
    parser.add_argument(
        "--grpc-max-connections",
        type=int,
        default=None,
        help="gRPC connections open at once; beyond it new ones are closed, so gRPC never takes the file "
        "descriptors REST needs (default: a quarter of the descriptor limit, at most 256)",
    )
    parser.add_argument(
        "--grpc-idle-timeout",
        type=float,
        default=30.0,
        help="seconds a gRPC connection with no call in progress stays open (a new one has --head-timeout "
        "to complete its handshake)",
    )
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--max-upload-mb", type=int, default=4096, help="largest model upload, unpacked (MiB)")
    parser.add_argument(
        "--max-request-mb",
        type=int,
        default=1024,
        help="largest request body, decompressed (MiB): an infer request holds its tensors in memory",
    )
    parser.add_argument(
        "--max-json-mb",
        type=int,
        default=64,
        help="largest JSON part of an infer request (MiB); binary tensors go up to --max-request-mb",
    )
    parser.add_argument(
        "--head-timeout",
        type=float,
        default=5.0,
        help="seconds a request line and headers may take to arrive before the connection is closed",
    )
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="open connections and running requests beyond which new requests get 503 (default: no limit)",
    )
    parser.add_argument(
        "--benchmark-seconds",
        type=float,
        default=30.0,
        help="longest a server-side benchmark may run (it stops early, reporting the repeats done)",
    )
    parser.add_argument("--workers", type=int, default=None, help="inference threads (default: Python's choice)")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=5.0,
        help="seconds to let open connections finish at shut-down before closing them",
    )
    parser.add_argument(
        "--batching",
        action="append",
        default=[],
        metavar="[MODEL=]MAX_BATCH_SIZE[,DELAY_US]",
        help="merge concurrent requests along dim 0 (Triton's dynamic batching): MODEL=16,500 for one model "
        "(over its MLmodel's arachne.batching), MODEL=off to never batch it, 16,500 for the models whose MLmodel "
        "declares a batch and leaves the batcher to the server (arachne.batching.dynamic_batching: false; "
        "capped by their max_batch_size; the others are logged as skipped); repeatable",
    )
    parser.add_argument(
        "--trust-key",
        action="append",
        default=[],
        metavar="PUBLIC_KEY",
        help="install only models signed by this key (a PEM public key, or a directory of *.pub/*.pem keys); "
        "repeatable (key rotation: trust the old and the new key for a while); default: signatures not required",
    )
    parser.add_argument(
        "--shm-regions",
        type=int,
        default=0,
        metavar="N",
        help="let clients on this machine register up to N system shared memory regions (Triton's extension; "
        "default 0: off)",
    )
    parser.add_argument(
        "--shm-max-mb", type=int, default=1024, help="the most bytes all shared memory regions may span (MiB)"
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--access-log", action="store_true", help="log a line per request (off by default: errors are still logged)"
    )
    pull = parser.add_argument_group(
        "pull mode",
        "follow MLflow registry aliases: the tracking server is MLFLOW_TRACKING_URI, with MLflow's credential "
        "variables (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_SERVER_CERT_PATH, "
        "MLFLOW_TRACKING_INSECURE_TLS)",
    )
    pull.add_argument(
        "--follow",
        action="append",
        default=[],
        metavar="NAME=models:/REGISTERED@ALIAS",
        help="serve NAME at the version the alias (or a version, models:/REGISTERED/3) names; repeatable",
    )
    pull.add_argument(
        "--follow-interval",
        type=float,
        default=60.0,
        help="seconds between registry checks (each wait is 0.5-1 times this; longer while the registry is down)",
    )
    pull.add_argument(
        "--follow-spread",
        type=float,
        metavar="SECONDS",
        help="spread downloads of a new version over this window, each device at its own place in it "
        "(from its name); default half the interval, 0 for none",
    )
    pull.add_argument(
        "--device-name",
        default=os.environ.get("ARACHNE_DEVICE_NAME") or socket.gethostname(),
        help="this device's name in the registry's arachne.devices.<NAME> tags "
        "(default $ARACHNE_DEVICE_NAME or the host name)",
    )


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    import uvicorn

    from arachne_mlflow.errors import ArachneError
    from arachne_mlflow.server.app import create_app
    from arachne_mlflow.server.http_limits import head_limited_protocol

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # A device server only runs TVM libraries: TVM's runtime library is enough, its compiler is not loaded.
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together")
    if not args.token and not _is_loopback(args.host):
        _logger.warning(
            "!!! The device server binds %s WITHOUT A TOKEN: anyone who can reach this port can upload and "
            "run code on this machine. Pass --token (or set ARACHNE_TOKEN) and preferably TLS. !!!",
            args.host,
        )
    try:
        app = create_app(settings_from_args(args))
    except ArachneError as err:
        raise SystemExit(f"arachne-mlflow serve: error: {err}") from err
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        http=head_limited_protocol(head_timeout=args.head_timeout),
        limit_concurrency=args.limit_concurrency,
        timeout_graceful_shutdown=args.graceful_timeout,
        server_header=False,  # no software banner; one header less to write and parse per request
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arachne_mlflow.server", description=__doc__)
    add_arguments(parser)
    return serve(parser.parse_args(argv))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The server's settings, once, from its flags (whose defaults read the environment)."""
    from arachne_mlflow.server.batching import BatchingPolicy
    from arachne_mlflow.server.settings import ServerSettings

    return ServerSettings(
        str(Path(args.model_store).expanduser()),
        token=args.token,
        max_upload_bytes=args.max_upload_mb * 1024**2,
        max_request_bytes=args.max_request_mb * 1024**2,
        max_json_bytes=args.max_json_mb * 1024**2,
        max_workers=args.workers,
        benchmark_seconds=args.benchmark_seconds,
        batching=BatchingPolicy.from_flags(args.batching),
        grpc_port=args.grpc_port,
        grpc_host=args.host,
        grpc_tls=(args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None,
        grpc_grace=args.graceful_timeout,
        grpc_limits=_grpc_limits(args),
        follow=_follow_config(args),
        trust_keys=_trust_keys(args),
        shm_regions=_non_negative("--shm-regions", args.shm_regions),
        shm_max_bytes=_non_negative("--shm-max-mb", args.shm_max_mb) * 1024**2,
        device_name=args.device_name,
    )


def _non_negative(flag: str, value: int) -> int:
    if value < 0:
        raise SystemExit(f"{flag} must not be negative")
    return value


def _trust_keys(args: argparse.Namespace) -> tuple:
    """The `--trust-key` files and directories, loaded now (a wrong key stops the server at start)."""
    if not args.trust_key:
        return ()
    from arachne_mlflow.model.signing import load_trusted_keys

    return tuple(load_trusted_keys(args.trust_key))


def _follow_config(args: argparse.Namespace):
    """The `--follow` flags as a `FollowConfig`, or None (the follow module loads only when asked for)."""
    if not args.follow:
        return None
    try:
        from arachne_mlflow.server.pull.follow import FollowConfig, parse_follows
        from arachne_mlflow.server.pull.registry_client import RegistryClient
    except ModuleNotFoundError as err:
        if err.name != "requests":
            raise
        raise SystemExit("--follow needs requests: pip install 'arachne-mlflow[pull]'") from err

    if not args.follow_interval > 0:
        raise SystemExit("--follow-interval must be a positive number of seconds")
    if args.follow_spread is not None and not 0 <= args.follow_spread < float("inf"):
        raise SystemExit("--follow-spread must be 0 or more seconds")
    return FollowConfig(
        follows=parse_follows(args.follow),
        registry=RegistryClient.from_env(),
        interval=args.follow_interval,
        device=args.device_name,
        spread=args.follow_spread,
    )


def _grpc_limits(args: argparse.Namespace):
    """The `--grpc-*` connection flags as `ConnectionLimits`, or None without `--grpc-port`."""
    if args.grpc_port is None:
        return None
    from arachne_mlflow.server.grpc_service import ConnectionLimits

    max_connections = args.grpc_max_connections
    if max_connections is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        max_connections = 256 if descriptors == resource.RLIM_INFINITY else max(1, min(256, descriptors // 4))
    if max_connections < 1 or not args.grpc_idle_timeout > 0 or not args.head_timeout > 0:
        raise SystemExit("--grpc-max-connections, --grpc-idle-timeout and --head-timeout must be positive")
    return ConnectionLimits(max_connections, args.grpc_idle_timeout, args.head_timeout)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
