"""The bearer-token check of both protocols (REST's `Authorization` header, gRPC's `authorization` metadata)."""

from __future__ import annotations

import hmac

#: What a client is told to send when the token is missing or wrong.
HOW_TO_AUTHENTICATE = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"


def bearer_matches(value: bytes | str | None, token: bytes) -> bool:
    """Whether an authorization value is `Bearer <token>`; the scheme in any case (RFC 9110 11.1),
    the token compared in constant time."""
    if not value:
        return False
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    scheme, _, given = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(b" "), token)
