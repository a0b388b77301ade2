"""MLflow flavor for ONNX models, run by onnxruntime.

    from arachne_mlflow.flavors import onnx as arachne_onnx
    info = arachne_onnx.log_model(model_proto, name="model",
                                  runtime_options={"providers": ["CPUExecutionProvider"]})

MLmodel also carries MLflow's own `onnx` flavor block, so `mlflow.onnx.load_model(uri)` gives
back the `onnx.ModelProto`.
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

RUNTIME = "onnx"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
_PROTOBUF_LIMIT = 2**31 - 1  # a larger model cannot be one protobuf: its weights go to external data
__all__ = [
    "FLAVOR_NAME",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "save_model",
    "log_model",
    "load_model",
]


def get_default_pip_requirements() -> list[str]:
    """onnxruntime, onnx and arachne-mlflow, pinned to the installed versions."""
    return _common.pinned_requirements("onnxruntime", "onnx")


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def save_model(
    model: Any,
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
    save_as_external_data: bool = False,
    labels: Any = None,
    image_format: str | dict[str, str] | None = None,
    capture: dict[str, Any] | None = None,
) -> None:
    """Save an ONNX model (`onnx.ModelProto`, `.onnx` path or bytes) as an MLflow model at `path`.

    The caller's ModelProto is never changed. Weights held as external data are inlined into
    one `model.onnx` (one file is simplest to ship to a device) unless the model is over 2 GB or
    `save_as_external_data` is set. `runtime_options` are `providers`, `provider_options` and
    `sess_options` (a dict) for onnxruntime, used at every load.
    `batching` declares the first dimension a batch (MLmodel `arachne.batching`, docs/flavors.md).
    `labels` (a file or a list of class labels) and `image_format` ("NCHW" or "NHWC") are for vision
    clients: see docs/flavors.md.
    `capture` are the rules of the field samples a device keeps (docs/capture.md), checked here.
    """
    options = _check_runtime_options(runtime_options)

    def write(directory: Path) -> _common.ModelFiles:
        _write_model(model, directory / MODEL_FILE, save_as_external_data)
        import onnx

        extra_files = [EXTERNAL_DATA_FILE] if (directory / EXTERNAL_DATA_FILE).is_file() else []
        providers = [p if isinstance(p, str) else p[0] for p in options.get("providers", ["CPUExecutionProvider"])]
        mlflow_onnx = {"onnx_version": onnx.__version__, "data": MODEL_FILE, "providers": providers}
        return _common.ModelFiles(
            MODEL_FILE, runtime_options=options, extra_files=extra_files, extra_flavors={"onnx": mlflow_onnx}
        )

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
    model: Any,
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
    save_as_external_data: bool = False,
    **kwargs: Any,
):
    """Log an ONNX model to the active run (or none); returns MLflow's `ModelInfo`."""
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
        save_as_external_data=save_as_external_data,
        **kwargs,
    )


def load_model(model_uri: str, dst_path: str | None = None, **runtime_options: Any):
    """Load the model as a `RuntimeModule`; `runtime_options` override the stored ones."""
    return _common.load_model(RUNTIME, model_uri, dst_path, **runtime_options)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    return _common.load_pyfunc(path, model_config)


def _check_runtime_options(runtime_options: dict[str, Any] | None) -> dict[str, Any]:
    """Only what MLmodel (YAML) can hold: provider names or [name, options] pairs, dict session options."""
    options = dict(runtime_options or {})
    unknown = set(options) - {"providers", "provider_options", "sess_options"}
    if unknown:
        raise InvalidInputError(
            f"unknown onnx runtime_options {sorted(unknown)}: use providers, provider_options, sess_options"
        )
    if "sess_options" in options and not isinstance(options["sess_options"], dict):
        raise InvalidInputError(
            "runtime_options['sess_options'] must be a dict (attributes and config entries) to be stored"
        )
    if "providers" in options:
        providers = options["providers"]
        providers = [providers] if isinstance(providers, str) else providers
        options["providers"] = [p if isinstance(p, str) else [p[0], dict(p[1])] for p in providers]
    return options


def _write_model(model: Any, target: Path, external: bool) -> None:
    import onnx

    if isinstance(model, (bytes, bytearray, memoryview)):
        if not external:
            target.write_bytes(bytes(model))
            return
        model = onnx.load_from_string(bytes(model))
    elif isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelNotFoundError(f"ONNX model file not found: {model}")
        model = onnx.load(os.fspath(model))  # also reads its external data, beside the file
    elif isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save_model with external data rewrites the proto it is given
        model = copy
    else:
        raise InvalidInputError(
            f"an ONNX model is an onnx.ModelProto, a .onnx path or bytes, got {type(model).__name__}"
        )
    if external or model.ByteSize() > _PROTOBUF_LIMIT:
        onnx.save_model(
            model,
            os.fspath(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=0,
        )
    else:
        target.write_bytes(model.SerializeToString())
