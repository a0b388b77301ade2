"""The pyfunc loader (`loader_module: arachne_mlflow.pyfunc`) for models the arachne flavors write.

`mlflow.pyfunc.load_model(uri)` calls `_load_pyfunc(path)`, which loads the model with the
unified runtime and wraps it. Importing this module loads neither MLflow nor pandas nor a DNN
library, and `predict` on an ndarray does no work that can be done once at load.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arachne_mlflow import runtime
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.spec import BFLOAT16


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ArachneModelWrapper:
    """Load the model at `path`; `model_config` (from `mlflow.pyfunc.load_model`) overrides runtime options,
    and of a model with variants its `variant` names the one to load (default: the first that runs here)."""
    options = dict(model_config or {})
    variant = options.pop("variant", None) or None
    return ArachneModelWrapper(runtime.load(read_model_dir(path, variant=variant), **options))


class ArachneModelWrapper:
    """`predict(data)` over a `RuntimeModule`; as thread-safe as `RuntimeModule.infer`."""

    def __init__(self, module: Any):
        self._module = module
        self._infer = module.infer
        self._input_specs = list(module.input_specs)
        self._input_names = [s.name for s in self._input_specs]
        self._output_names = [s.name for s in module.output_specs]
        self._single_input = len(self._input_specs) == 1
        self._single_output = len(self._output_names) == 1
        self._batch = _fixed_batch(self._input_specs, module.output_specs)
        self._batch_shape = (self._batch,)
        self._bfloat16_inputs = [i for i, s in enumerate(self._input_specs) if s.dtype == BFLOAT16]
        self._bfloat16_outputs = [i for i, s in enumerate(module.output_specs) if s.dtype == BFLOAT16]
        if self._bfloat16_inputs or self._bfloat16_outputs:
            self._infer = self._infer_as_float32

    def get_raw_model(self) -> Any:
        """The `RuntimeModule` (MLflow's `PyFuncModel.get_raw_model()` returns this)."""
        return self._module

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """ndarray (single-input model), dict name→array or DataFrame in; ndarray or dict name→ndarray out.

        `params` is accepted for MLflow's calling convention; these models take no inference parameters.
        """
        if type(data) is np.ndarray and self._single_input:
            inputs = [data]
            chunked = self._batch is not None and data.shape[:1] != self._batch_shape
        else:
            if isinstance(data, dict):
                try:
                    inputs = [data[name] for name in self._input_names]
                except KeyError as err:
                    raise InvalidInputError(
                        f"missing input {err.args[0]!r}: the model takes {self._input_names}"
                    ) from err
            else:
                inputs = self._convert(data)
            chunked = self._batch is not None and getattr(inputs[0], "shape", ())[:1] != self._batch_shape
        outputs = self._infer_in_chunks(inputs) if chunked else self._infer(inputs)
        if self._single_output:
            return outputs[0]
        return dict(zip(self._output_names, outputs))

    def _infer_as_float32(self, inputs: list[Any]) -> list[np.ndarray]:
        """bfloat16 tensors are float32 to MLflow (its signature cannot name bfloat16): cast at this edge."""
        inputs = list(inputs)
        for i in self._bfloat16_inputs:
            inputs[i] = np.asarray(inputs[i], dtype=BFLOAT16)
        outputs = self._module.infer(inputs)
        for i in self._bfloat16_outputs:
            outputs[i] = outputs[i].astype(np.float32)
        return outputs

    def _convert(self, data: Any) -> list[Any]:
        if isinstance(data, np.ndarray):
            raise InvalidInputError(
                f"an ndarray can only feed a single-input model; this one takes {self._input_names}: pass a dict"
            )
        if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):
            return self._from_frame(data)
        if isinstance(data, (list, tuple)) and self._single_input:
            return [data]
        raise InvalidInputError(
            f"predict takes an ndarray, a dict name->ndarray or a pandas DataFrame, got {type(data).__name__}"
        )

    def _from_frame(self, frame: Any) -> list[np.ndarray]:
        """DataFrame columns are the inputs; a single input may also be the whole frame's values."""
        if self._single_input and self._input_names[0] not in frame.columns:
            spec = self._input_specs[0]
            return [_reshape(frame.to_numpy().astype(spec.dtype, copy=False), spec)]
        missing = [name for name in self._input_names if name not in frame.columns]
        if missing:
            raise InvalidInputError(f"the DataFrame lacks columns {missing}: the model takes {self._input_names}")
        return [_reshape(_column_values(frame[spec.name], spec), spec) for spec in self._input_specs]

    def _infer_in_chunks(self, inputs: list[Any]) -> list[np.ndarray]:
        """Run a batch of another size than the model's fixed batch in chunks of that size, then stack."""
        arrays = [np.asarray(x) for x in inputs]
        rows = {_rows(x) for x in arrays}
        if len(rows) != 1 or None in rows:
            raise InvalidInputError(
                f"inputs {self._input_names} must have the same number of rows, got {sorted(rows, key=str)}"
            )
        n, size = rows.pop(), self._batch
        if n == 0:
            raise InvalidInputError("an empty batch has nothing to predict")
        chunks = []
        for start in range(0, n, size):
            part = [x[start : start + size] for x in arrays]
            if part[0].shape[0] < size:  # pad the last chunk with zeros, drop its extra rows after
                part = [np.concatenate([p, np.zeros((size - p.shape[0], *p.shape[1:]), p.dtype)]) for p in part]
            chunks.append(self._infer(part))
        return [np.concatenate([c[i] for c in chunks])[:n] for i in range(len(self._output_names))]


def _fixed_batch(inputs: list[Any], outputs: list[Any]) -> int | None:
    """The model's fixed leading (batch) dimension when every input and output shares it."""
    if not inputs:
        return None
    leading = {s.shape[0] if s.shape else None for s in (*inputs, *outputs)}
    if len(leading) == 1 and (size := leading.pop()) not in (None, -1):
        return size
    return None


def _rows(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    return shape[0] if shape else None


def _column_values(column: Any, spec: Any) -> np.ndarray:
    """A column of scalars, or of arrays/lists (one tensor row per cell), as one ndarray."""
    values = column.to_numpy()
    if values.dtype == object:
        values = np.stack([np.asarray(v) for v in values])
    return values.astype(spec.dtype, copy=False)


def _reshape(values: np.ndarray, spec: Any) -> np.ndarray:
    """Rows of flattened values to the tensor's shape, when its non-batch dimensions are fixed."""
    tail = spec.shape[1:]
    if spec.shape and -1 not in tail and values.shape[1:] != tuple(tail):
        try:
            return values.reshape((-1, *tail))
        except ValueError as err:
            raise InvalidInputError(
                f"input {spec.name!r}: cannot reshape {list(values.shape)} to {list(spec.shape)}"
            ) from err
    return values
