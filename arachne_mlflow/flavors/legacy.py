"""Import an old Arachne model (a package tar, or a model file with its env.yaml) as an MLflow model.

`model_spec` becomes the signature, `tvm_device` the TVM flavor's device, and the old pip
`dependencies` extra pip requirements, except the DNN libraries the flavor's own (current,
pinned) requirements replace. Other dependencies (cuda, cudnn, tensorrt) go to the model's
metadata as `legacy_dependencies`, since pip cannot install them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.legacy import LegacyEnv, extract_package, read_env_file

RUNTIME_BY_SUFFIX = {".tflite": "tflite", ".onnx": "onnx", ".so": "tvm", ".tar": "tvm"}
# Old pip packages that the flavors' default requirements supersede.
SUPERSEDED = {"tvm", "apache-tvm", "tensorflow", "tensorflow-cpu", "tflite-runtime", "onnx", "onnxruntime"}


def save_legacy_model(
    path: str | os.PathLike, package_tar=None, model_file=None, env_file=None, runtime: str | None = None, **kwargs: Any
) -> None:
    """Save the old model as an MLflow model at `path`; `kwargs` go to the flavor's `save_model`."""
    with _legacy_arguments(package_tar, model_file, env_file, runtime, kwargs) as (flavor, model, arguments):
        flavor.save_model(model, path, **arguments)


def log_legacy_model(
    name: str | None = None, package_tar=None, model_file=None, env_file=None, runtime: str | None = None, **kwargs: Any
):
    """Log the old model (see `save_legacy_model`); returns MLflow's `ModelInfo`."""
    with _legacy_arguments(package_tar, model_file, env_file, runtime, kwargs) as (flavor, model, arguments):
        return flavor.log_model(model, name=name, **arguments)


@contextlib.contextmanager
def _legacy_arguments(package_tar, model_file, env_file, runtime, kwargs) -> Iterator[tuple[Any, str, dict]]:
    """The flavor module, the model file and the flavor arguments the old files amount to."""
    if (package_tar is None) == (model_file is None):
        raise InvalidInputError("give either package_tar or model_file (with env_file)")
    with tempfile.TemporaryDirectory(prefix="arachne-legacy-") as workdir:
        if package_tar is not None:
            model_file, found_env = extract_package(package_tar, workdir)
            env_file = env_file or found_env
        env = read_env_file(env_file) if env_file is not None else LegacyEnv()
        runtime = runtime or RUNTIME_BY_SUFFIX.get(Path(model_file).suffix)
        if runtime not in ("tflite", "onnx", "tvm"):
            raise InvalidInputError(
                f"cannot tell the runtime of {Path(model_file).name}: pass runtime= (tflite, onnx or tvm)"
            )
        yield (
            importlib.import_module(f"arachne_mlflow.flavors.{runtime}"),
            os.fspath(model_file),
            _arguments(runtime, env, kwargs),
        )


def _arguments(runtime: str, env: LegacyEnv, kwargs: dict[str, Any]) -> dict[str, Any]:
    arguments = dict(kwargs)
    if env.inputs and arguments.get("signature") is None and arguments.get("model_spec") is None:
        if runtime == "tvm":
            arguments["model_spec"] = env.model_spec
        else:
            from arachne_mlflow.flavors._common import to_mlflow_signature

            arguments["signature"] = to_mlflow_signature(env.inputs, env.outputs)
    if runtime == "tvm" and env.tvm_device:
        arguments.setdefault("tvm_device", env.tvm_device)
    pip, other = split_dependencies(env.dependencies)
    if pip and not any(
        arguments.get(k) is not None for k in ("pip_requirements", "extra_pip_requirements", "conda_env")
    ):
        arguments["extra_pip_requirements"] = pip
    if other:
        arguments["metadata"] = {"legacy_dependencies": other, **(arguments.get("metadata") or {})}
    return arguments


def split_dependencies(dependencies: list[Any]) -> tuple[list[str], dict[str, str]]:
    """The old env.yaml `dependencies` as (pip requirements to keep, other dependencies).

    They look like `[{"pip": [{"onnx": "1.10.0"}]}, {"cuda": "11.1"}]`.
    """
    pip: list[str] = []
    other: dict[str, str] = {}
    for entry in dependencies:
        if not isinstance(entry, dict):
            other[str(entry)] = ""
            continue
        for key, value in entry.items():
            if key != "pip":
                other[str(key)] = str(value)
                continue
            for item in value or []:
                pairs = item.items() if isinstance(item, dict) else [(item, None)]
                for name, version in pairs:
                    if str(name).lower() not in SUPERSEDED:
                        pip.append(f"{name}=={version}" if version else str(name))
    return pip, other
