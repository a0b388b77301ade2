"""Turn what `predict` receives into the named arrays, of the model's dtypes, that a device takes.

`mlflow deployments predict` reads its input file with `pd.read_json`, so `{"inputs": [[...]]}`
arrives as a one-column DataFrame of rows (float64 or int64) and `{"inputs": {"a": ..., "b":
...}}` as a column indexed by input name; the model's input dtypes come from the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from arachne_mlflow.protocol.datatypes import from_datatype


def to_arrays(inputs: Any, specs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Named arrays from an ndarray (single-input model), a dict of arrays or a DataFrame.

    `specs` is the V2 metadata of the model's inputs (`name`, `datatype`, `shape`). Numbers are
    cast to the input's dtype when numpy calls that safe or same-kind (JSON gives float64 and
    int64); anything else goes as it is, and the device says what it expected.
    """
    import pandas as pd

    names = [spec["name"] for spec in specs]
    if isinstance(inputs, pd.DataFrame):
        arrays = _from_frame(inputs, specs)
    elif isinstance(inputs, Mapping):
        arrays = dict(inputs)
    elif len(names) == 1:
        arrays = {names[0]: inputs}
    else:
        raise MlflowException(f"the model takes several inputs {names}: pass a dict name -> array")
    dtypes = {spec["name"]: from_datatype(spec["datatype"]) for spec in specs}
    return {str(name): _cast(np.asarray(value), dtypes.get(str(name))) for name, value in arrays.items()}


def _from_frame(frame: Any, specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names = [spec["name"] for spec in specs]
    if list(frame.columns) == ["inputs"]:  # the CLI's {"inputs": ...}
        column = frame["inputs"]
        if len(names) > 1 or (len(column) and all(str(key) in names for key in column.index)):
            return {str(key): np.asarray(value) for key, value in column.items()}
        return {names[0]: _stack(column)}
    if set(map(str, frame.columns)) <= set(names):  # one column per input, a cell per row
        return {str(col): _stack(frame[col]) for col in frame.columns}
    if len(names) == 1:  # the values of a plain frame, shaped like the input
        values = frame.to_numpy()
        shape = list(specs[0]["shape"])[1:]
        return {names[0]: values.reshape(len(frame), *shape) if shape and min(shape) > 0 else values}
    raise MlflowException(f"the DataFrame's columns {list(map(str, frame.columns))} are not the model's inputs {names}")


def _stack(column: Any) -> np.ndarray:
    return np.stack([np.asarray(cell) for cell in column]) if column.dtype == object else column.to_numpy()


def _cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or array.dtype == dtype or dtype.kind == "O" or not np.can_cast(array.dtype, dtype, "same_kind"):
        return array
    return array.astype(dtype)
