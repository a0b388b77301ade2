"""Triton's classification extension: an output asked for with the parameter `classification: N`
(tritonclient's `class_count=N`) answers its N highest classes instead of the tensor.

Each answer is a BYTES string "score:index:label" ("score:index" where the output has no label for
that index), highest first: a model that batches answers shape [batch, N] (one row per batch row),
any other model [N] over its whole output, as Triton does. Scores are written like C++'s
`std::to_string` (six decimals), as Triton writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError

#: The request parameter of an output that asks for its top classes.
PARAMETER = "classification"
#: The largest class count a request may ask (as many as a labels file may name); the answer holds
#: at most as many as the output has.
MAX_CLASS_COUNT = 100_000
#: The most strings one answer may hold (rows x classes): each is a Python object while it is made.
MAX_ANSWERS = 1_000_000


def class_count(value: Any, output: str) -> int:
    """The `classification` parameter of a requested output: a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CLASS_COUNT:
        raise InvalidInputError(
            f"output {output!r}: 'classification' must be a positive integer up to {MAX_CLASS_COUNT}, got {value!r}"
        )
    return value


def top_classes(array: np.ndarray, count: int, labels: Sequence[str], batched: bool, output: str) -> np.ndarray:
    """The `count` highest classes of `array` (per batch row when `batched`) as "score:index[:label]"."""
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"output {output!r} holds {array.dtype.name} values: classification needs numbers")
    rows = array.reshape(array.shape[0] if batched and array.ndim else 1, -1)
    count = min(count, rows.shape[1])
    if rows.shape[0] * count > MAX_ANSWERS:
        raise InvalidInputError(
            f"output {output!r}: {rows.shape[0]} rows x {count} classes is more than {MAX_ANSWERS} answers; ask fewer"
        )
    answers = np.empty((rows.shape[0], count), dtype=object)
    for r, row in enumerate(rows):
        for k, index in enumerate(np.argsort(-row.astype(np.float64), kind="stable")[:count]):
            text = f"{float(row[index]):f}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            answers[r, k] = text.encode()
    return answers if batched else answers[0]
