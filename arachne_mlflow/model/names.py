"""Model names on a device server, checked the same way by the server and the client.

A name is also a directory name in the server's model store, so it is kept to a safe alphabet.
"""

from __future__ import annotations

import re

from arachne_mlflow.errors import InvalidInputError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_model_name(name: object) -> bool:
    """1-128 letters, digits, `._-`, starting with a letter or digit, without `..`."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None and ".." not in name


def check_name(name: str) -> str:
    """Return `name` if it is a model name (`is_model_name`), else a 400 that says what one is."""
    if not is_model_name(name):
        raise InvalidInputError(
            f"invalid model name {str(name)[:140]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name
