"""Why a device could not be reached, in a user's words: the one table both HTTP stacks of the client use.

requests and urllib3 wrap the socket's error three deep ("HTTPConnectionPool(host=..., port=...): Max
retries exceeded with url: ... (Caused by NewConnectionError(...))"); a user needs the cause at the
bottom of that chain, named: connection refused, timed out, name not resolved.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator

from arachne_mlflow.errors import DeviceUnreachableError

_BY_ERRNO = {
    errno.ECONNREFUSED: "connection refused (is the server running, on that port?)",
    errno.ECONNRESET: "the connection was reset",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EPIPE: "the connection was closed",
}


class ConnectTimeoutError(TimeoutError):
    """Opening the connection timed out (a plain `TimeoutError` is a wait for an answer)."""


def unreachable(where: str, err: BaseException) -> DeviceUnreachableError:
    """`DeviceUnreachableError("device cam-1 (10.0.0.5:5051) is unreachable: connection refused ...")`;
    `where` names the device: "device cam-1 (10.0.0.5:5051)" or "device server at 10.0.0.5:5051"."""
    tls = next((cause for cause in _chain(err) if isinstance(cause, ssl.SSLError)), None)
    if tls is not None:
        detail = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or str(tls)
        return DeviceUnreachableError(
            f"TLS with the {where} failed ({detail}): check tls, ca_cert and the device's certificate"
        )
    return DeviceUnreachableError(f"{where} is unreachable: {reason(err)}")


def reason(err: BaseException) -> str:
    """The cause of a failed connection, in words; the innermost error's text when it is none of those."""
    causes = list(_chain(err))
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return "name not resolved (check the host name, or use its IP address)"
        if type(cause).__name__ in ("ConnectTimeoutError", "ConnectTimeout"):  # (requests', urllib3's)
            return "timed out connecting (the device is off, or a firewall drops the connection)"
        if isinstance(cause, TimeoutError) or type(cause).__name__ in ("ReadTimeoutError", "ReadTimeout"):
            return "timed out waiting for an answer"
        if isinstance(cause, OSError) and cause.errno in _BY_ERRNO:
            return _BY_ERRNO[cause.errno]
        if isinstance(cause, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError)):
            return _BY_ERRNO.get(cause.errno or 0, "the connection was closed")
    innermost = causes[-1]
    return str(innermost) or type(innermost).__name__


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and what caused it: `__cause__`, `__context__`, urllib3's `reason` and exceptions in `args`."""
    todo: list[BaseException] = [err]
    seen: set[int] = set()
    while todo and len(seen) < 32:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [item for item in linked if isinstance(item, BaseException)]
