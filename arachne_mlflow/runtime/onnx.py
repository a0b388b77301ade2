"""ONNX backend: onnxruntime, with providers, provider options and session options passed through."""

from __future__ import annotations

import ctypes
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arachne_mlflow.errors import ArachneError, IncompatibleModelError, InvalidInputError, MissingDependencyError
from arachne_mlflow.model.onnx_external import check_external_data
from arachne_mlflow.model.spec import BFLOAT16, TensorSpec
from arachne_mlflow.runtime import onnx_options
from arachne_mlflow.runtime.base import RuntimeModule

_logger = logging.getLogger(__name__)

# onnxruntime's type strings -> numpy dtypes
ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
    "tensor(bfloat16)": BFLOAT16,
}
_BFLOAT16_ONNX_TYPE = 16  # onnx.TensorProto.BFLOAT16


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingDependencyError("the onnx runtime needs onnxruntime: pip install 'arachne-mlflow[onnx]'") from err
    return onnxruntime


class ONNXRuntimeModule(RuntimeModule):
    """An ONNX model in an onnxruntime `InferenceSession` (which is safe to call from many threads)."""

    server_options = onnx_options.TOP_LEVEL

    @classmethod
    def check_server_options(cls, options: Mapping[str, Any], where: str = "runtime_options") -> None:
        super().check_server_options(options, where)
        onnx_options.check(options, where)

    def __init__(
        self,
        model_file: str | None = None,
        *,
        model_content: bytes | None = None,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        provider_options: Sequence[dict] | None = None,
        sess_options: Any = None,
    ):
        if (model_file is None) == (model_content is None):
            raise InvalidInputError("onnx runtime needs exactly one of model_file or model_content")
        ort = import_onnxruntime()
        check_external_data(model_file if model_file is not None else model_content)  # before onnxruntime reads it
        names, options = normalize_providers(providers, provider_options, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(
                model_file if model_file is not None else model_content,
                sess_options=session_options(ort, sess_options),
                providers=names,
                provider_options=options,
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise InvalidInputError(f"onnx runtime: cannot load model {model_file or '<bytes>'}: {err}") from err
        inputs = [_spec(arg) for arg in self._session.get_inputs()]
        outputs = [_spec(arg) for arg in self._session.get_outputs()]
        self._input_names = [s.name for s in inputs]
        self._output_names = [s.name for s in outputs]
        # The public run, not the C++ session's: it retries on the CPU provider when an execution
        # provider fails at run time (a flaky CUDA/TensorRT provider on a Jetson).
        self._run = self._session.run
        # One RunOptions for every call: passing None has onnxruntime build a default one per
        # call. Run only reads it, so threads can share it.
        self._run_options = ort.RunOptions()
        self._bind_specs(inputs, outputs)
        # String and bfloat16 tensors need conversions the Python API does not do (see below);
        # every other model keeps the plain call.
        self._text_inputs = [i for i, spec in enumerate(inputs) if spec.dtype.kind == "O"]
        self._text_outputs = any(spec.dtype.kind == "O" for spec in outputs)
        if any(spec.dtype == BFLOAT16 for spec in (*inputs, *outputs)):
            if self._text_inputs:
                raise IncompatibleModelError(
                    "onnx runtime: a model with both bfloat16 and string inputs cannot run through onnxruntime's "
                    "Python API (bfloat16 needs OrtValues, which cannot hold strings)"
                )
            self._ort_value = ort.OrtValue
            self._infer = self._infer_ort_values
        elif self._text_inputs or self._text_outputs:
            self._infer = self._infer_text

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return self._session.get_providers()

    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) == 1:
            return self._run(self._output_names, {self._input_names[0]: inputs[0]}, self._run_options)
        return self._run(self._output_names, dict(zip(self._input_names, inputs)), self._run_options)

    def _infer_text(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Strings: onnxruntime takes `str` elements only (it would `str()` a bytes object into
        "b'...'") and holds UTF-8 text only, in and out."""
        inputs = list(inputs)
        for i in self._text_inputs:
            inputs[i] = _utf8_text(self.input_specs[i].name, inputs[i])
        try:
            return ONNXRuntimeModule._infer(self, inputs)
        except UnicodeDecodeError as err:
            raise ArachneError(
                f"onnx runtime: the model gave a string output that is not UTF-8 text ({err}), which onnxruntime's "
                "Python API cannot return"
            ) from err

    def _infer_ort_values(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """bfloat16: numpy has no such type of its own, so onnxruntime takes and gives OrtValues."""
        feed = {name: self._to_ort_value(x) for name, x in zip(self._input_names, inputs)}
        results = self._session.run_with_ort_values(self._output_names, feed, self._run_options)
        return [_from_ort_value(value, spec.dtype) for value, spec in zip(results, self.output_specs)]

    def _to_ort_value(self, x: np.ndarray) -> Any:
        if x.dtype == BFLOAT16:
            return self._ort_value.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(x).view(np.uint16), _BFLOAT16_ONNX_TYPE
            )
        return self._ort_value.ortvalue_from_numpy(np.ascontiguousarray(x))

    def _close(self) -> None:
        self._session = self._run = self._run_options = None


def normalize_providers(
    providers: Sequence[str | tuple[str, dict]] | None,
    provider_options: Sequence[dict] | None,
    available: Sequence[str],
) -> tuple[list[str], list[dict]]:
    """Split `providers` into names and options, dropping unavailable ones with a warning.

    Accepts names or `(name, options)` pairs, as onnxruntime does; falls back to the CPU
    provider when nothing asked for is available.
    """
    if providers is None:
        providers = ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    if provider_options is not None and len(provider_options) != len(providers):
        raise InvalidInputError(
            f"provider_options has {len(provider_options)} entries but providers has {len(providers)}"
        )
    names: list[str] = []
    options: list[dict] = []
    for i, entry in enumerate(providers):
        if isinstance(entry, str):
            name, opts = entry, {}
        elif (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], dict)
        ):
            name, opts = entry
        else:
            raise InvalidInputError(
                f"providers[{i}] = {entry!r}: expected a provider name or a (name, options dict) pair"
            )
        if provider_options is not None:
            opts = {**opts, **provider_options[i]}
        names.append(name)
        options.append(dict(opts))
    kept = [(n, o) for n, o in zip(names, options) if n in available]
    if len(kept) != len(names):
        missing = [n for n in names if n not in available]
        if not kept:
            kept = [("CPUExecutionProvider", {})]
        warnings.warn(
            f"ONNX Runtime providers {missing} are not available here (available: {list(available)}); "
            f"using {[n for n, _ in kept]}",
            RuntimeWarning,
            stacklevel=4,
        )
    return [n for n, _ in kept], [o for _, o in kept]


def session_options(ort: Any, sess_options: Any) -> Any:
    """An `ort.SessionOptions` from one, or from a plain dict of attributes and config entries.

    Keys naming a `SessionOptions` attribute (`intra_op_num_threads`, `graph_optimization_level`,
    ...) are set as attributes; dotted keys (`session.intra_op.allow_spinning`) are config entries.
    """
    if sess_options is None or isinstance(sess_options, ort.SessionOptions):
        return sess_options
    if not isinstance(sess_options, dict):
        raise InvalidInputError(
            f"sess_options must be an onnxruntime.SessionOptions or a dict, got {type(sess_options).__name__}"
        )
    result = ort.SessionOptions()
    for key, value in sess_options.items():
        if "." in key:
            result.add_session_config_entry(key, str(value))
        elif hasattr(result, key) and not key.startswith("_"):
            if key == "graph_optimization_level" and isinstance(value, str):
                value = getattr(ort.GraphOptimizationLevel, value)
            elif key == "execution_mode" and isinstance(value, str):
                value = getattr(ort.ExecutionMode, value)
            try:
                setattr(result, key, value)
            except TypeError as err:
                raise InvalidInputError(f"sess_options[{key!r}] = {value!r}: {err}") from err
        else:
            raise InvalidInputError(
                f"unknown onnxruntime session option {key!r}: use a SessionOptions attribute or a dotted config key"
            )
    return result


def _utf8_text(name: str, items: np.ndarray) -> np.ndarray:
    """An object array of `str` from one of `bytes` or `str` (strict UTF-8: no lossy replacement)."""
    text = np.empty(items.shape, dtype=object)
    flat = text.reshape(-1)
    for i, item in enumerate(items.reshape(-1).tolist()):
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidInputError(
                    f"input {name!r}: element {i} is not UTF-8 text ({err.reason} at byte {err.start}); onnxruntime "
                    "string tensors hold UTF-8 text only"
                ) from err
        elif not isinstance(item, str):
            raise InvalidInputError(
                f"input {name!r}: element {i} is a {type(item).__name__}; a string tensor takes str or UTF-8 bytes"
            )
        flat[i] = item
    return text


def _from_ort_value(value: Any, dtype: np.dtype) -> np.ndarray:
    if dtype != BFLOAT16:
        return value.numpy()
    shape = value.shape()
    size = value.tensor_size_in_bytes()
    if not size:
        return np.empty(shape, dtype)
    return np.frombuffer(ctypes.string_at(value.data_ptr(), size), dtype).reshape(shape)


def _spec(arg: Any) -> TensorSpec:
    dtype = ONNX_TYPES.get(arg.type)
    if dtype is None:
        raise InvalidInputError(f"onnx runtime: tensor {arg.name!r} has unsupported type {arg.type}")
    return TensorSpec.create(arg.name, dtype, arg.shape)
