"""TFLite backend: LiteRT (`ai_edge_litert`) first, then `tflite_runtime`, then `tensorflow.lite`."""

from __future__ import annotations

from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError, MissingDependencyError
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.runtime.base import RuntimeModule

_INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


def load_interpreter_class() -> type:
    """The first TFLite `Interpreter` class installed, lightest first (never TF if LiteRT is there)."""
    import importlib

    for module_name in _INTERPRETER_MODULES:
        try:
            return importlib.import_module(module_name).Interpreter
        except ImportError:
            continue
    raise MissingDependencyError(
        "the tflite runtime needs LiteRT: pip install 'arachne-mlflow[tflite]' (or tflite-runtime / tensorflow)"
    )


class TFLiteRuntimeModule(RuntimeModule):
    """A TFLite model in a LiteRT interpreter; inputs of another batch size resize the tensors.

    An interpreter holds its tensors, so one inference runs at a time (`thread_safe = False`).
    """

    thread_safe = False
    server_options = {
        "num_threads": int,
        "experimental_op_resolver_type": str,
        "experimental_preserve_all_tensors": bool,
        "experimental_disable_delegate_clustering": bool,
        "experimental_default_delegate_latest_features": bool,
    }

    def __init__(self, model_file: str | None = None, *, model_content: bytes | None = None, **options: Any):
        if (model_file is None) == (model_content is None):
            raise InvalidInputError("tflite runtime needs exactly one of model_file or model_content")
        interpreter_class = load_interpreter_class()
        options = _resolve_enum_options(interpreter_class, options)
        try:
            self._interpreter = interpreter_class(model_path=model_file, model_content=model_content, **options)
        except TypeError as err:
            raise InvalidInputError(
                f"tflite runtime: unsupported interpreter option in {sorted(options)}: {err}"
            ) from err
        except ValueError as err:
            raise InvalidInputError(f"tflite runtime: cannot load model {model_file or '<bytes>'}: {err}") from err
        self._interpreter.allocate_tensors()
        in_details = self._interpreter.get_input_details()
        out_details = self._interpreter.get_output_details()
        self._input_indices = [d["index"] for d in in_details]
        self._output_indices = [d["index"] for d in out_details]
        self._current_shapes = [tuple(int(x) for x in d["shape"]) for d in in_details]
        # bound once: attribute lookups are a visible share of a tiny model's call
        interpreter = self._interpreter
        self._set_tensor, self._invoke, self._get_tensor = (
            interpreter.set_tensor,
            interpreter.invoke,
            interpreter.get_tensor,
        )
        if len(self._input_indices) == 1 and len(self._output_indices) == 1:
            self._infer = self._infer_one  # the common case without the loops: a third of a tiny call
            self._input_index, self._output_index = self._input_indices[0], self._output_indices[0]
        self._bind_specs([_spec(d) for d in in_details], [_spec(d) for d in out_details])
        # Writing a string tensor resets its shape signature in LiteRT, after which a strict resize
        # refuses its dynamic dimensions; the specs (from the signature at load) have checked the
        # shape already, so those resize unchecked.
        self._strict_resize = [spec.dtype.kind != "O" for spec in self.input_specs]

    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if [x.shape for x in inputs] != self._current_shapes:
            self._resize([x.shape for x in inputs])
        set_tensor, get_tensor = self._set_tensor, self._get_tensor
        for index, value in zip(self._input_indices, inputs):
            set_tensor(index, value)
        self._invoke()
        return [get_tensor(index) for index in self._output_indices]

    def _infer_one(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        x = inputs[0]
        if x.shape != self._current_shapes[0]:
            self._resize([x.shape])
        self._set_tensor(self._input_index, x)
        self._invoke()
        return [self._get_tensor(self._output_index)]

    def _resize(self, shapes: list[tuple[int, ...]]) -> None:
        """Resize input tensors the model declares dynamic (`shape_signature` -1), then reallocate."""
        for index, shape, strict in zip(self._input_indices, shapes, self._strict_resize):
            self._interpreter.resize_tensor_input(index, shape, strict=strict)
        self._interpreter.allocate_tensors()
        self._current_shapes = [tuple(shape) for shape in shapes]

    def _close(self) -> None:
        self._interpreter = self._set_tensor = self._invoke = self._get_tensor = None


def _resolve_enum_options(interpreter_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """`experimental_op_resolver_type` may be given by name (as MLmodel's YAML stores it)."""
    value = options.get("experimental_op_resolver_type")
    if not isinstance(value, str):
        return options
    import sys

    enum = sys.modules[interpreter_class.__module__].OpResolverType
    try:
        return {**options, "experimental_op_resolver_type": enum[value]}
    except KeyError as err:
        raise InvalidInputError(
            f"experimental_op_resolver_type {value!r} is not one of {[e.name for e in enum]}"
        ) from err


def _spec(detail: dict[str, Any]) -> TensorSpec:
    shape = detail.get("shape_signature")
    if shape is None or (len(shape) == 0 and len(detail["shape"]) != 0):
        shape = detail["shape"]
    dtype = np.dtype(detail["dtype"])
    # A string tensor is `np.bytes_` in the details; the interpreter takes object arrays of bytes
    # (any bytes: TFLite strings are byte buffers) or str (written as UTF-8), and gives bytes.
    return TensorSpec.create(detail["name"], np.object_ if dtype.kind in "SU" else dtype, shape)
