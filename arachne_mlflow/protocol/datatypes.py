"""V2 (Open Inference Protocol) datatype names, the numpy dtypes they stand for, and Triton's names.

BF16 is `ml_dtypes.bfloat16`, the numpy extension type onnx, LiteRT and tritonclient all use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import BFLOAT16

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": BFLOAT16,
    "BYTES": np.dtype(np.object_),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def to_datatype(dtype: Any) -> str:
    """The V2 datatype name of a numpy dtype (strings and bytes are BYTES)."""
    name = _NAMES.get(dtype)
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NAMES[dtype.newbyteorder("=")]
    except KeyError as err:
        raise InvalidInputError(f"dtype {dtype.name} has no V2 datatype") from err


def from_datatype(name: Any) -> np.dtype:
    """The numpy dtype of a V2 datatype name."""
    try:
        return DATATYPES[name]
    except (KeyError, TypeError) as err:
        raise InvalidInputError(f"unknown datatype {name!r}; known: {sorted(DATATYPES)}") from err


def config_datatype(dtype: Any) -> str:
    """Triton's model-configuration name of a dtype: `TYPE_` and the V2 name; BYTES is TYPE_STRING."""
    name = to_datatype(dtype)
    return "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
