"""Model names on a device server, checked the same way by the server and the client.

A name is also a directory name in the server's model store, so it is kept to a safe alphabet.
"""

from __future__ import annotations

import re

from arachne_mlflow.errors import InvalidInputError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """Return `name` if it is 1-128 letters, digits, `._-`, starts with a letter or digit, has no `..`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidInputError(
            f"invalid model name {str(name)[:140]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name
