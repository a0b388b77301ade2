"""The unified runtime: one API over TFLite, ONNX and TVM (call-compatible with Arachne Runtime).

from arachne_mlflow import runtime
m = runtime.init(runtime="onnx", model_file="m.onnx")
m.set_input(0, x); m.run(); y = m.get_output(0)
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.runtime.base import RuntimeModule, random_tensor
from arachne_mlflow.runtime.registry import (
    ENTRY_POINT_GROUP,
    get_runtime_class,
    list_runtimes,
    register_runtime,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RuntimeModule",
    "get_runtime_class",
    "init",
    "load",
    "list_runtimes",
    "random_tensor",
    "register_runtime",
]


def init(
    runtime: str,
    model_file: str | os.PathLike | None = None,
    env_file: str | os.PathLike | None = None,
    package_tar: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    rpc_info: dict[str, Any] | None = None,
    **options: Any,
) -> RuntimeModule:
    """Load a model with the named runtime and return its `RuntimeModule`.

    `model_file` is the model; `env_file` an old Arachne `env.yaml` (its `model_spec` and
    `tvm_device` become options); `package_tar` an old Arachne package (model + env.yaml),
    extracted into a private temporary directory; `model_dir` an MLflow model directory with
    the `arachne` flavor, or a directory holding one model file and its env.yaml. Other keyword
    arguments go to the backend (`num_threads`, `providers`, `tvm_device`, ...). With
    `rpc_info={"host", "port"}` (or `{"device": "cam-1"}`, a fleet file's device) the model runs on
    that device server instead (`RemoteRuntimeModule`, the same methods); its token is
    `rpc_info["token"]`, else `$ARACHNE_TOKEN` (docs/runtime.md, "Remote mode").
    """
    cls = get_runtime_class(runtime)
    workdir = None
    try:
        if package_tar is not None:
            from arachne_mlflow.model.legacy import extract_package

            workdir = tempfile.mkdtemp(prefix="arachne-package-")
            model_file, found_env = extract_package(package_tar, workdir)
            env_file = env_file or found_env
        elif model_dir is not None:
            from arachne_mlflow.model.legacy import find_model_in_dir

            if not Path(model_dir).is_dir():
                raise ModelNotFoundError(f"model directory not found: {model_dir}")
            if model_file is None and (Path(model_dir) / "MLmodel").is_file():
                return _init_mlflow_model_dir(runtime, model_dir, rpc_info, options)
            if model_file is None:
                model_file, found_env = find_model_in_dir(model_dir)
                env_file = env_file or found_env
            else:
                model_file = Path(model_dir) / model_file
        if env_file is not None and runtime == "tvm":
            _apply_env_file(env_file, options)
        if model_file is not None and not Path(model_file).exists():
            raise ModelNotFoundError(f"model file not found: {model_file}")
        model_file = None if model_file is None else os.fspath(model_file)
        if rpc_info is not None:
            from arachne_mlflow.runtime.remote import RemoteRuntimeModule

            module = RemoteRuntimeModule(runtime, rpc_info, model_file, **options)
        else:
            module = _construct(cls, model_file, options)
    except BaseException:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    if workdir is not None:
        module._on_done(shutil.rmtree, workdir, True)
    return module


def _construct(cls: type[RuntimeModule], model_file: str | None, options: dict[str, Any]) -> RuntimeModule:
    """A backend gets the model file first; a plugin written for the earlier Arachne Runtime, whose
    `init` passed it as the keyword `model`, gets it that way (`__init__(self, model, ...)` or only
    `**kwargs`), so the earlier plugins load unchanged."""
    if _takes_model_keyword(cls):
        return cls(model=model_file, **options)
    return cls(model_file, **options)


def _takes_model_keyword(cls: type) -> bool:
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # (after self)
    except (TypeError, ValueError):  # a constructor written in C: the positional convention
        return False
    kinds = {p.kind for p in parameters}
    if any(p.name == "model" and p.kind is not inspect.Parameter.POSITIONAL_ONLY for p in parameters):
        return True
    positional = {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD}
    return inspect.Parameter.VAR_KEYWORD in kinds and not kinds & {*positional, inspect.Parameter.VAR_POSITIONAL}


def _init_mlflow_model_dir(
    runtime: str, model_dir: str | os.PathLike, rpc_info: dict[str, Any] | None, options: dict[str, Any]
) -> RuntimeModule:
    """An MLflow model directory with the `arachne` flavor loads as its MLmodel says (option `variant`:
    which of its variants; default the first that runs here)."""
    model = read_model_dir(model_dir, variant=options.pop("variant", None))
    if model.runtime != runtime:
        raise InvalidInputError(f"{model_dir} holds a {model.runtime!r} model, not {runtime!r}")
    if rpc_info is not None:
        from arachne_mlflow.runtime.remote import RemoteRuntimeModule

        kwargs = model.init_kwargs(**options)
        kwargs.pop("runtime")
        return RemoteRuntimeModule(runtime, rpc_info, **kwargs)
    return load(model, **options)


def load(model: ArachneModel, variant: str | None = None, **overrides: Any) -> RuntimeModule:
    """Load an MLflow model directory's `arachne` model as its MLmodel says; `overrides` replace
    stored runtime options. `variant` names one of its variants (default: the one `model` describes,
    chosen when it was read). A model built for another machine raises `IncompatibleModelError`."""
    if variant is not None:
        model = model.variant(variant)
    model.check_compatible()
    return init(**model.init_kwargs(**overrides))


def _apply_env_file(env_file: str | os.PathLike, options: dict[str, Any]) -> None:
    """An old env.yaml gives TVM its tensor spec and device, unless passed explicitly."""
    from arachne_mlflow.model.legacy import read_env_file

    env = read_env_file(env_file)
    if env.inputs or env.outputs:
        options.setdefault("model_spec", env.model_spec)
    if env.tvm_device:
        options.setdefault("tvm_device", env.tvm_device)
