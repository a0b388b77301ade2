"""MLflow flavor for TFLite models, run by LiteRT (`ai-edge-litert`, not full TensorFlow).

from arachne_mlflow.flavors import tflite
info = tflite.log_model("model.tflite", name="model", registered_model_name="cnn")
module = tflite.load_model(info.model_uri)            # a RuntimeModule
mlflow.pyfunc.load_model(info.model_uri).predict(x)   # through arachne_mlflow.pyfunc
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.flavors import _common
from arachne_mlflow.model.directory import FLAVOR_NAME

RUNTIME = "tflite"
MODEL_FILE = "model.tflite"
__all__ = [
    "FLAVOR_NAME",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "save_model",
    "log_model",
    "load_model",
]


def get_default_pip_requirements() -> list[str]:
    """LiteRT and arachne-mlflow, pinned to the installed versions."""
    return _common.pinned_requirements("ai-edge-litert")


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def save_model(
    model: str | os.PathLike | bytes,
    path: str | os.PathLike,
    conda_env=None,
    code_paths: list[str] | None = None,
    mlflow_model=None,
    signature: ModelSignature | None = None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    metadata: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    runtime_options: dict[str, Any] | None = None,
    labels: Any = None,
    image_format: str | dict[str, str] | None = None,
    capture: dict[str, Any] | None = None,
) -> None:
    """Save a TFLite model (a `.tflite` path or the model bytes) as an MLflow model at `path`.

    `runtime_options` are LiteRT interpreter options (`num_threads`, ...) used at every load.
    `batching` declares the first dimension a batch (MLmodel `arachne.batching`, docs/flavors.md).
    `labels` (a file or a list of class labels) and `image_format` ("NCHW" or "NHWC") are for vision
    clients: see docs/flavors.md.
    `capture` are the rules of the field samples a device keeps (docs/capture.md), checked here.
    """

    def write(directory: Path) -> _common.ModelFiles:
        (directory / MODEL_FILE).write_bytes(_model_bytes(model))
        return _common.ModelFiles(MODEL_FILE, runtime_options=dict(runtime_options or {}))

    _common.save_model(
        RUNTIME,
        path,
        write,
        get_default_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        mlflow_model=mlflow_model,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        batching=batching,
        labels=labels,
        image_format=image_format,
        capture=capture,
    )


def log_model(
    model: str | os.PathLike | bytes,
    name: str | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    signature: ModelSignature | None = None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    runtime_options: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """Log a TFLite model to the active run (or none); returns MLflow's `ModelInfo`."""
    return _common.log_model(
        sys.modules[__name__],
        model,
        name,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        runtime_options=runtime_options,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None, **runtime_options: Any):
    """Load the model as a `RuntimeModule`; `runtime_options` override the stored ones."""
    return _common.load_model(RUNTIME, model_uri, dst_path, **runtime_options)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    return _common.load_pyfunc(path, model_config)


def _model_bytes(model: Any) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelNotFoundError(f"TFLite model file not found: {model}")
        return Path(model).read_bytes()
    raise InvalidInputError(f"a TFLite model is a .tflite path or bytes, got {type(model).__name__}")
