"""Turn what `predict` receives into the named arrays, of the model's dtypes, that a device takes.

`mlflow deployments predict` reads its input file with `pd.read_json`, so `{"inputs": [[...]]}`
arrives as a one-column DataFrame of rows (float64 or int64) and `{"inputs": {"a": ..., "b":
...}}` as a column indexed by input name; the model's input dtypes come from the device. A name
the model does not take is refused here, naming it and the model's inputs, before anything is sent.
(A file that is not JSON fails in MLflow's own CLI, in `pd.read_json`, before this plugin loads.)
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
        arrays = _named(dict(inputs), names)
    elif len(names) == 1:
        arrays = {names[0]: inputs}
    else:
        raise MlflowException(f"the model takes several inputs {names}: pass a dict name -> array")
    dtypes = {spec["name"]: from_datatype(spec["datatype"]) for spec in specs}
    return {str(name): _cast(np.asarray(value), dtypes.get(str(name))) for name, value in arrays.items()}


def expected_shape(names: Sequence[str]) -> str:
    """What an input file for this model looks like, for error messages."""
    if len(names) == 1:
        name = names[0]
        return f'an input file like {{"inputs": [[...], ...]}} (rows of {name!r}) or {{"inputs": {{"{name}": ...}}}}'
    return "an input file like {" + '"inputs": {' + ", ".join(f'"{name}": [...]' for name in names) + "}}"


def _named(arrays: dict[Any, Any], names: Sequence[str]) -> dict[str, Any]:
    unknown = sorted(str(key) for key in arrays if str(key) not in names)
    if unknown:
        raise MlflowException(
            f"the model has no input {', '.join(map(repr, unknown))}: its inputs are {list(names)} "
            f"(give {expected_shape(names)})"
        )
    return {str(key): value for key, value in arrays.items()}


def _from_frame(frame: Any, specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names = [spec["name"] for spec in specs]
    if list(frame.columns) == ["inputs"]:  # the CLI's {"inputs": ...}
        column = frame["inputs"]
        if len(column) and all(isinstance(key, str) for key in column.index):  # {"inputs": {"name": ...}}
            return _named({key: np.asarray(value) for key, value in column.items()}, names)
        if len(names) > 1:
            raise MlflowException(f"the model takes several inputs {names}: give {expected_shape(names)}")
        return {names[0]: _stack(column)}
    columns = list(map(str, frame.columns))
    if set(columns) <= set(names):  # one column per input, a cell per row
        return {str(col): _stack(frame[col]) for col in frame.columns}
    if all(isinstance(col, int) for col in frame.columns):  # a plain frame of numbers
        if len(names) > 1:
            raise MlflowException(f"the model takes several inputs {names}: give {expected_shape(names)}")
        return {names[0]: _reshaped(frame.to_numpy(), specs[0])}
    unknown = [col for col in columns if col not in names]
    raise MlflowException(
        f"the input file names {unknown}, which the model does not take: its inputs are {names} "
        f"(give {expected_shape(names)})"
    )


def _reshaped(values: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The rows of a plain frame, shaped like the input (`[-1, 4]`: rows of 4)."""
    shape = list(spec["shape"])[1:]
    if not shape or min(shape) <= 0:
        return values
    try:
        return values.reshape(len(values), *shape)
    except ValueError as err:
        raise MlflowException(
            f"input {spec['name']!r} takes rows of shape {shape}, but the file's rows have "
            f"{values.shape[1] if values.ndim > 1 else 1} values (give {expected_shape([spec['name']])})"
        ) from err


def _stack(column: Any) -> np.ndarray:
    return np.stack([np.asarray(cell) for cell in column]) if column.dtype == object else column.to_numpy()


def _cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or array.dtype == dtype or dtype.kind == "O" or not np.can_cast(array.dtype, dtype, "same_kind"):
        return array
    return array.astype(dtype)
