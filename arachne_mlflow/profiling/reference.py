"""The inputs a profile compares devices on, and the reference variant's answers on the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arachne_mlflow import runtime
from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError
from arachne_mlflow.flavors.agreement import example_inputs
from arachne_mlflow.model.directory import ArachneModel


@dataclass
class Inputs:
    """The model's inputs in order; where they came from; for an evaluation, the data and its target column."""

    arrays: list[np.ndarray]
    source: str  # "input_example", "generated" or "data (N of M rows)"
    data: Any = None
    targets: str | None = None


def profile_inputs(model: ArachneModel, data: Any, targets: str | None, sample_rows: int) -> Inputs:
    """From `data` (at most `sample_rows` rows, evenly spread), else the model's input example, else
    generated from its signature."""
    if data is None:
        if targets is not None:
            raise InvalidInputError("targets name a column of the data: give the data too")
        arrays, source = example_inputs(_input_example(model), model.inputs)
        return Inputs(arrays, source)
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if targets is not None and targets not in data.columns:
            raise InvalidInputError(f"the data has no column {targets!r}: {list(map(str, data.columns))}")
        rows = _spread(len(data), sample_rows)
        sample = data.iloc[rows].reset_index(drop=True)
        features = sample.drop(columns=[targets]) if targets is not None else sample
        arrays = _frame_arrays(features, model)
        return Inputs(arrays, f"data ({len(rows)} of {len(data)} rows)", sample, targets)
    if targets is not None:
        raise InvalidInputError("with targets, the data is a DataFrame holding the target column")
    arrays, _ = example_inputs(data, model.inputs)
    rows = _spread(len(arrays[0]), sample_rows)
    return Inputs([a[rows] for a in arrays], f"data ({len(rows)} of {len(arrays[0])} rows)")


def reference_outputs(reference: ArachneModel, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The reference variant's answers on this host (the figures every device is compared with)."""
    try:
        with runtime.load(reference) as module:
            return module.infer(arrays)
    except IncompatibleModelError as err:
        raise IncompatibleModelError(
            f"the reference variant {reference.variant_name!r} cannot run on this host, so nothing can be "
            f"compared with it: {err}"
        ) from err


def _spread(count: int, most: int) -> np.ndarray:
    """At most `most` row indices spread evenly over `count` rows (all of them when there are fewer)."""
    if count <= most:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, most).round().astype(int))


def _frame_arrays(features: Any, model: ArachneModel) -> list[np.ndarray]:
    """A DataFrame's rows as the model's inputs: a column per input, or the columns as one input's rows."""
    specs = model.inputs
    if set(map(str, features.columns)) >= {s.name for s in specs} and specs:
        return [np.stack(features[s.name].to_numpy()).astype(s.dtype) for s in specs]
    if len(specs) != 1:
        raise InvalidInputError(f"the data's columns must name the model's inputs {[s.name for s in specs]}")
    values = features.to_numpy(dtype=specs[0].dtype)
    shape = [int(d) for d in specs[0].shape[1:]]
    if shape and min(shape) > 0 and int(np.prod(shape)) == values.shape[1]:
        values = values.reshape(len(values), *shape)
    return [values]


def _input_example(model: ArachneModel) -> Any:
    """The input example saved with the model (None when there is none)."""
    from mlflow.models import Model

    try:
        return Model.load(str(model.path)).load_input_example(str(model.path))
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"the model's input example cannot be read: {err}") from err
