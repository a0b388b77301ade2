"""Sequence batching (Triton's stateful models) is not served: requests that name a sequence are refused.

A client of a stateful model sends `sequence_id` with `sequence_start` / `sequence_end`; a server
without a stateful backend would run each request alone and answer as if the state were kept.
Triton's clients send these parameters only for a sequence (a zero id, or false, means none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arachne_mlflow.errors import InvalidInputError

PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def refuse_sequence(parameters: Mapping[str, Any]) -> None:
    """Raise a 400 when the request `parameters` (plain values) name a sequence."""
    named = [key for key in PARAMETERS if key in parameters and parameters[key] not in (0, "", False, None)]
    if named:
        raise InvalidInputError(
            f"the request names a sequence ({', '.join(named)}): sequence batching is not supported by this "
            "server (it has no stateful backend); send requests without sequence parameters"
        )
