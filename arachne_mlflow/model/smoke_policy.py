"""The one smoke-test policy: what a smoke inference sends and what its answer must be.

Two paths test a model by running it once before it counts as deployed: the push side's health
gate (deployments/gate.py, over the network) and a pulling device's child process
(server/pull/smoke.py). Both take their inputs and checks from here, so a model gets the same verdict
on both: MLflow's saved input example when it fits the model's inputs (numbers cast within their
kind), else generated inputs of the specs (zeros for integers, which are often indices and zero
is valid for any table; random floats and booleans; empty strings); the answer must have the
signature's outputs, with their dtypes and shapes (-1 matches any). Neither MLflow nor the
server is imported: the example file is read as MLflow writes it (`input_example.json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.directory import ArachneModel
from arachne_mlflow.model.spec import TensorSpec

MAX_EXAMPLE_BYTES = 16 * 1024**2


def example_path(model: ArachneModel) -> Path | None:
    """The saved input example's file inside the model directory, if MLmodel names one and it is there."""
    info = model.mlmodel.get("saved_input_example_info")
    name = info.get("artifact_path") if isinstance(info, dict) else None
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    path = model.path / name
    return path if path.is_file() else None


def load_example(path: Path) -> Any:
    """The JSON of a saved input example (at most `MAX_EXAMPLE_BYTES`); `InvalidInputError` if unreadable."""
    try:
        if path.stat().st_size > MAX_EXAMPLE_BYTES:
            raise InvalidInputError(f"the input example {path} is larger than {MAX_EXAMPLE_BYTES} bytes")
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise InvalidInputError(
            f"the input example saved with the model ({path}) cannot be read ({err}): the smoke test needs it; "
            "log the model again with a valid input_example"
        ) from err


def smoke_inputs(specs: Sequence[TensorSpec], example: Any = None) -> list[np.ndarray]:
    """One input per spec: from `example` (the example's JSON, or named arrays) when it fits, else generated."""
    if example is not None:
        try:
            values = _example_values(specs, example)
            return [spec.check(_cast(np.asarray(value), spec.dtype)) for spec, value in zip(specs, values)]
        except (InvalidInputError, ValueError, TypeError, KeyError):
            pass  # not an example of these tensors: generated inputs below
    return [generated_input(spec) for spec in specs]


def generated_input(spec: TensorSpec) -> np.ndarray:
    """An input of `spec`'s dtype and shape (dynamic dims as 1): zeros for integers, random numbers
    for floats and booleans, empty strings for strings."""
    shape, kind = spec.example_shape(), spec.dtype.kind
    rng = np.random.default_rng(0)
    if kind == "O":
        return np.full(shape, b"", dtype=object)
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return np.zeros(shape, spec.dtype)  # integers (and anything else): zeros


def check_outputs(outputs: Mapping[str, np.ndarray], expected: Sequence[TensorSpec]) -> None:
    """Raise `InvalidInputError` unless `outputs` are the signature's: same names, dtypes and shapes."""
    names = [spec.name for spec in expected]
    if sorted(outputs) != sorted(names):
        raise InvalidInputError(f"the smoke inference answered outputs {sorted(outputs)}; the signature has {names}")
    for spec in expected:
        try:
            spec.check(outputs[spec.name], "output")
        except InvalidInputError as err:
            raise InvalidInputError(f"the smoke inference broke the signature: {err}") from err


def _example_values(specs: Sequence[TensorSpec], example: Any) -> list[Any]:
    """The example's value for each spec: a dict by name, `{"inputs": ...}`, a split DataFrame, or one array."""
    if isinstance(example, Mapping) and "inputs" in example and len(example) == 1:
        example = example["inputs"]
    if isinstance(example, Mapping) and {"columns", "data"} <= set(example):  # a DataFrame, split orient
        columns = list(example["columns"])
        if len(specs) == 1 and specs[0].name not in columns:
            return [example["data"]]
        rows = example["data"]
        example = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
    if isinstance(example, Mapping):
        return [example[spec.name] for spec in specs]
    if len(specs) == 1:
        return [example]
    raise KeyError("one unnamed example for several inputs")


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """JSON numbers (float64, int64) cast to the input's dtype when numpy calls that safe or same-kind."""
    if array.dtype == dtype or dtype.kind == "O" or not np.can_cast(array.dtype, dtype, "same_kind"):
        if dtype.kind == "O" and array.dtype.kind == "U":
            return np.vectorize(str.encode, otypes=[object])(array)
        return array
    return array.astype(dtype)
