"""Tensor specs: the names, dtypes and shapes a model takes and gives (-1 for a dynamic dimension).

One type for the runtime, the flavors (MLflow signatures) and the server (V2 metadata), so each
converts at its own edge and the checks on user input live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from arachne_mlflow.errors import InvalidInputError

#: bfloat16 is numpy's extension type from ml_dtypes (importing it makes `np.dtype("bfloat16")` parse).
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def _dim(value: Any) -> int:
    """A dimension as an int; None, symbols ("batch", "n") and negatives become -1 (dynamic)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value) if value >= 0 else -1
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return _dim(int(value))
    return -1


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor of a model."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def create(cls, name: str, dtype: Any, shape: Iterable[Any]) -> TensorSpec:
        try:
            dt = np.dtype(dtype)
        except TypeError as err:
            raise InvalidInputError(f"tensor {name!r}: unknown dtype {dtype!r}") from err
        return cls(str(name), dt, tuple(_dim(d) for d in shape))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """From `{"name", "dtype", "shape"}` (the runtime details and the old env.yaml entries)."""
        missing = {"name", "dtype", "shape"} - set(data)
        if missing:
            raise InvalidInputError(f"tensor spec {dict(data)!r} lacks {sorted(missing)}")
        return cls.create(data["name"], data["dtype"], data["shape"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    @property
    def is_static(self) -> bool:
        return -1 not in self.shape

    def example_shape(self, dynamic: int = 1) -> tuple[int, ...]:
        """A concrete shape, dynamic dimensions taken as `dynamic`."""
        return tuple(dynamic if d == -1 else d for d in self.shape)

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want == -1 or want == got for want, got in zip(self.shape, shape))

    def check(self, value: Any, what: str = "input") -> np.ndarray:
        """Return `value` as an ndarray this tensor takes, or raise an error that says why not.

        Lists and scalars are converted to the tensor's dtype; an ndarray of another dtype is an
        error, since a silent cast would hide a bug in the caller's preprocessing. A string tensor
        (object dtype) also takes numpy's fixed-width str and bytes arrays, as objects.
        """
        if type(value) is not np.ndarray:
            if not isinstance(value, np.ndarray):
                try:
                    value = np.asarray(value, dtype=self.dtype)
                except (TypeError, ValueError) as err:
                    raise InvalidInputError(
                        f"{what} {self.name!r}: cannot convert to {self.dtype.name}: {err}"
                    ) from err
        if value.dtype is not self.dtype and value.dtype != self.dtype:  # (numpy's own dtypes are singletons)
            if self.dtype.kind == "O" and value.dtype.kind in "US":
                return self.check(value.astype(object), what)
            raise InvalidInputError(f"{what} {self.name!r}: expected dtype {self.dtype.name}, got {value.dtype.name}")
        if value.shape != self.shape and not self.accepts_shape(value.shape):
            raise InvalidInputError(
                f"{what} {self.name!r}: expected shape {list(self.shape)} (-1 = any), got {list(value.shape)}"
            )
        return value


def specs_from_dicts(items: Iterable[Mapping[str, Any]] | None) -> list[TensorSpec]:
    return [TensorSpec.from_dict(item) for item in items or ()]
