"""How a device server's address is written: the one place both HTTP stacks of the client take it from.

An IPv6 literal goes in brackets in URLs and the Host header (`http://[::1]:5051`, RFC 3986),
never bare (`http://::1:5051` is no URL); sockets take it without them.
"""

from __future__ import annotations


def socket_host(host: str) -> str:
    """The host as a socket takes it: `[::1]` and `::1` both become `::1`."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def authority(host: str, port: int) -> str:
    """`host:port` for URLs, the Host header and messages: `[::1]:5051` for an IPv6 literal."""
    host = socket_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def base_url(host: str, port: int, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{authority(host, port)}"
