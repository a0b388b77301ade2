"""A predictor callable for a model deployed on a device, for `mlflow.models.evaluate(model=fn, ...)`.

    fn = device_predictor("arachne-jetson://cam-1", "detector", classes=True)
    mlflow.models.evaluate(model=fn, data=frame, targets="label", model_type="classifier")

MLflow calls `fn` with the feature columns of `data` (a DataFrame); `fn` sends them to the device
in requests of at most `batch_rows` rows (or the model's fixed batch size) and returns the device's
own answers, so the accuracy metrics and plots MLflow logs are the device's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from arachne_mlflow.deployments.inputs import to_arrays
from arachne_mlflow.deployments.targets import Connection, Device
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.datatypes import from_datatype

#: Rows per request unless the model fixes its batch size: well under the device's request bounds
#: for the small tabular and image models this is used with.
DEFAULT_BATCH_ROWS = 64
#: The most rows one call may send in all (a predictor is for evaluation sets, not bulk scoring).
MAX_ROWS = 100_000


def device_predictor(
    target: str,
    name: str,
    *,
    output: str | None = None,
    classes: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    config: Mapping[str, Any] | None = None,
) -> Callable[[Any], np.ndarray]:
    """A callable that runs model `name` on the one device `target` names (`-C`-style `config`:
    token, tls, timeouts). It returns the output `output` (default: the first), or, with `classes`,
    its argmax over the last axis (a classifier's labels)."""
    from arachne_mlflow.deployments.targets import resolve_target, settings

    chosen = settings(config)
    devices = resolve_target(target, chosen.fleet)
    if len(devices) != 1:
        raise InvalidInputError(f"a predictor runs on one device; {target!r} names {len(devices)}")
    return predictor_on(devices[0], chosen.connection, name, output=output, classes=classes, batch_rows=batch_rows)


def predictor_on(
    device: Device,
    connection: Connection,
    name: str,
    *,
    output: str | None = None,
    classes: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Callable[[Any], np.ndarray]:
    """`device_predictor` for a device already resolved (a profile's scratch model, for one)."""
    if not 1 <= batch_rows <= 10_000:
        raise InvalidInputError(f"batch_rows must be in [1, 10000], got {batch_rows}")
    with connection.client(device) as client:
        metadata = client.model_metadata(name)
    inputs, outputs = metadata.get("inputs") or [], metadata.get("outputs") or []
    wanted = output or (outputs[0]["name"] if outputs else None)
    if wanted not in {o.get("name") for o in outputs}:
        raise InvalidInputError(f"model {name!r} on {device} has no output {wanted!r}: {[o['name'] for o in outputs]}")
    rows = _rows_per_request(inputs, batch_rows)

    def predict(data: Any) -> np.ndarray:
        arrays = _arrays(data, inputs)
        count = len(next(iter(arrays.values())))
        if count > MAX_ROWS:
            raise InvalidInputError(f"{count} rows is more than a predictor sends ({MAX_ROWS})")
        answers = []
        with connection.client(device) as client:
            for start in range(0, count, rows):
                chunk = {key: value[start : start + rows] for key, value in arrays.items()}
                answers.append(client.infer(name, chunk, outputs=[wanted])[wanted])
        result = np.concatenate(answers) if answers else np.empty((0,))
        return np.argmax(result, axis=-1) if classes else result

    return predict


def _rows_per_request(inputs: Sequence[Mapping[str, Any]], batch_rows: int) -> int:
    """The model's fixed batch size when its inputs fix one, else `batch_rows`."""
    firsts = {int(spec["shape"][0]) for spec in inputs if spec.get("shape")}
    fixed = [size for size in firsts if size > 0]
    return fixed[0] if len(fixed) == 1 else batch_rows


def _arrays(data: Any, inputs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Named arrays from what MLflow's evaluator passes: a DataFrame of feature columns (rows of a
    single input), or anything `mlflow deployments predict` takes."""
    import pandas as pd

    if isinstance(data, pd.DataFrame) and len(inputs) == 1 and not set(map(str, data.columns)) <= {inputs[0]["name"]}:
        spec = inputs[0]
        values = data.to_numpy(dtype=from_datatype(spec["datatype"]))
        shape = [int(d) for d in spec.get("shape", [])[1:]]
        if shape and min(shape) > 0 and int(np.prod(shape)) == values.shape[1]:
            values = values.reshape(len(values), *shape)
        return {spec["name"]: values}
    return to_arrays(data, inputs)
