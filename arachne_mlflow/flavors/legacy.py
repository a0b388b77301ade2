"""Import an old Arachne model (a package tar, or a model file with its env.yaml) as an MLflow model.

`model_spec` becomes the signature, `tvm_device` the TVM flavor's device, and the old pip
`dependencies` extra pip requirements, except the DNN libraries the flavor's own (current,
pinned) requirements replace and pins that contradict arachne-mlflow's own requirements
(`numpy==1.21.0` where it needs `numpy>=1.24`: MLflow would warn at every load, and pip could not
install both), each dropped with a log line. Other dependencies (cuda, cudnn, tensorrt) go to
the model's metadata as `legacy_dependencies`, since pip cannot install them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.legacy import LegacyEnv, extract_package, read_env_file

_logger = logging.getLogger(__name__)

RUNTIME_BY_SUFFIX = {".tflite": "tflite", ".onnx": "onnx", ".so": "tvm", ".tar": "tvm"}
# How the Python functions name what the old files may lack; the CLI names its flags instead.
ARGUMENTS = {"runtime": "runtime= (tflite, onnx or tvm)", "env_file": "env_file= (an env.yaml with model_spec)"}


class MissingLegacyArgumentError(InvalidInputError):
    """The old files do not say something the import needs; `argument` is the key of what to pass."""

    def __init__(self, template: str, argument: str):
        super().__init__(template.format(argument=ARGUMENTS[argument]))
        self.template, self.argument = template, argument

    def naming(self, names: dict[str, str]) -> InvalidInputError:
        """The same error, naming what to pass as `names` says (the CLI's flags)."""
        return InvalidInputError(self.template.format(argument=names[self.argument]))


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
            raise MissingLegacyArgumentError(
                f"cannot tell the runtime of {Path(model_file).name}: pass {{argument}}", "runtime"
            )
        flavor = importlib.import_module(f"arachne_mlflow.flavors.{runtime}")
        yield flavor, os.fspath(model_file), _arguments(runtime, env, kwargs, flavor)


def _arguments(runtime: str, env: LegacyEnv, kwargs: dict[str, Any], flavor: Any) -> dict[str, Any]:
    arguments = dict(kwargs)
    if runtime == "tvm" and not env.inputs and not any(arguments.get(k) for k in ("signature", "model_spec")):
        raise MissingLegacyArgumentError(
            "a TVM library carries no tensor spec and the old files give none: pass {argument}", "env_file"
        )
    if env.inputs and arguments.get("signature") is None and arguments.get("model_spec") is None:
        if runtime == "tvm":
            arguments["model_spec"] = env.model_spec
        else:
            from arachne_mlflow.flavors._common import to_mlflow_signature

            arguments["signature"] = to_mlflow_signature(env.inputs, env.outputs)
    if runtime == "tvm" and env.tvm_device:
        arguments.setdefault("tvm_device", env.tvm_device)
    pip, other = split_dependencies(env.dependencies)
    pip = drop_contradicting_pins(pip, [*flavor.get_default_pip_requirements(), *own_requirements()])
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


def own_requirements() -> list[str]:
    """What installing arachne-mlflow with its `mlflow` extra requires (what a logged model needs)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        declared = [Requirement(text) for text in requires("arachne-mlflow") or ()]
    except PackageNotFoundError:  # (run from a source tree that is not installed)
        return []
    return [str(r) for r in declared if r.marker is None or r.marker.evaluate({"extra": "mlflow"})]


def drop_contradicting_pins(pip: list[str], ours: list[str]) -> list[str]:
    """`pip` without the requirements whose versions none of `ours` (for the same package) allows."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    required: dict[str, list[Requirement]] = {}
    for text in ours:
        requirement = Requirement(text)
        required.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    kept = []
    for text in pip:
        try:
            old = Requirement(text)
        except InvalidRequirement:
            kept.append(text)
            continue
        pinned = [s.version for s in old.specifier if s.operator in ("==", "===")]
        clashes = [
            str(r) for r in required.get(canonicalize_name(old.name), ()) if pinned and pinned[0] not in r.specifier
        ]
        if clashes:
            _logger.warning(
                "dropped %s from the old env.yaml's dependencies: arachne-mlflow requires %s (the model keeps that)",
                text,
                " and ".join(clashes),
            )
            continue
        kept.append(text)
    return kept
