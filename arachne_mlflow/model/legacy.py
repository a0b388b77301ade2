"""The earlier Arachne Runtime's files: `env.yaml` and the package tar (model file + env.yaml).

Read here once, for the runtime (`env_file=`, `package_tar=`) and for the flavors' import of
legacy models. Nothing here imports a DNN library or MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.archive import safe_extract
from arachne_mlflow.model.spec import TensorSpec, specs_from_dicts

ENV_FILE_NAME = "env.yaml"


@dataclass
class LegacyEnv:
    """What an `env.yaml` says: the tensor spec, the TVM device and the dependencies."""

    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    tvm_device: str | None = None
    dependencies: list[Any] = field(default_factory=list)

    @property
    def model_spec(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}


def parse_env(data: Any, source: str = "env.yaml") -> LegacyEnv:
    if not isinstance(data, dict):
        raise InvalidInputError(f"{source}: expected a mapping with 'model_spec', got {type(data).__name__}")
    spec = data.get("model_spec") or {}
    if not isinstance(spec, dict):
        raise InvalidInputError(f"{source}: 'model_spec' must be a mapping with 'inputs' and 'outputs'")
    return LegacyEnv(
        inputs=specs_from_dicts(spec.get("inputs")),
        outputs=specs_from_dicts(spec.get("outputs")),
        tvm_device=data.get("tvm_device"),
        dependencies=list(data.get("dependencies") or []),
    )


def read_env_file(path: str | os.PathLike) -> LegacyEnv:
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"env file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidInputError(f"{path}: not valid YAML: {err}") from err
    return parse_env(data, str(path))


def extract_package(package_tar: str | os.PathLike, dest: str | os.PathLike) -> tuple[Path, Path | None]:
    """Extract an old Arachne package tar into `dest`; return (model file, env.yaml or None)."""
    if not Path(package_tar).is_file():
        raise ModelNotFoundError(f"package tar not found: {package_tar}")
    safe_extract(package_tar, dest)
    return find_model_in_dir(dest)


def find_model_in_dir(directory: str | os.PathLike) -> tuple[Path, Path | None]:
    """The one model file in a legacy directory (beside its env.yaml), and the env.yaml if any."""
    directory = Path(directory)
    env = directory / ENV_FILE_NAME
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.name != ENV_FILE_NAME)
    if len(candidates) != 1:
        names = [p.name for p in candidates]
        raise InvalidInputError(f"{directory}: expected one model file beside {ENV_FILE_NAME}, found {names or 'none'}")
    return candidates[0], (env if env.is_file() else None)
