"""JSON from the network or from a registry tag, parsed within bounds that are checked before parsing.

A parser's memory grows with the containers it builds, not with the bytes it reads: a short text of
`{}` or `[` costs tens of times its size (and the standard library's parser a `RecursionError`). So
the size and the number of containers (brackets counted on the raw text at C speed; brackets inside
strings count too, which only errs on the safe side) are checked first, then orjson parses it, then
the nesting depth is checked on what was built.
"""

from __future__ import annotations

from typing import Any

import orjson

from arachne_mlflow.errors import InvalidInputError

MAX_CONTAINERS = 10_000
MAX_DEPTH = 32


def loads(
    data: bytes | str,
    what: str,
    *,
    max_bytes: int,
    max_containers: int = MAX_CONTAINERS,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse `data`, or raise `InvalidInputError` naming `what` and the bound it broke."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise InvalidInputError(f"{what} is {len(raw)} bytes, over the {max_bytes} allowed")
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > max_containers:
        raise InvalidInputError(f"{what} holds {containers} objects or arrays, over the {max_containers} allowed")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidInputError(f"{what} is not valid JSON: {err}") from err
    if _depth(value) > max_depth:
        raise InvalidInputError(f"{what} nests deeper than {max_depth} levels")
    return value


def _depth(value: Any) -> int:
    """The nesting depth of objects and arrays (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
