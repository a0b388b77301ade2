"""Pull mode's download: a model version's MLmodel, then only the files it names, from the registry
(of a model with variants, only the files of the variant this device runs).

Every name MLmodel gives is checked against an allow-list before it becomes a path; the total is
bounded by the store's upload cap and one try by a deadline; a dropped link leaves a partial file
that the next try resumes (HTTP Range, in `RegistryClient.fetch_artifact`).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.arch import machine_arch
from arachne_mlflow.model.directory import ENVIRONMENT_FILES, MLMODEL, ArachneModel, read_model_dir
from arachne_mlflow.model.signing import (
    MAX_RELEASE_BYTES,
    MAX_SIGNATURE_BYTES,
    RELEASE_FILE,
    SIGNATURE_FILE,
    signature_artifact_path,
)
from arachne_mlflow.server.pull.registry_client import ModelVersion, RegistryClient
from arachne_mlflow.server.pull.smoke import MAX_EXAMPLE_BYTES

MAX_MLMODEL_BYTES = 1024**2
MAX_FILES = 1000
EXAMPLE = "input_example.json"  # the saved input example, beside the model's files
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,254}$")


def download_version(
    registry: RegistryClient,
    mv: ModelVersion,
    stage: Path,
    max_bytes: int,
    seconds: float,
    stop: threading.Event,
    signed: bool = False,
) -> Path:
    """MLmodel first, then the files it names, into `stage/files` (the example beside it, as `EXAMPLE`):
    at most `max_bytes` in all, within `seconds`; `stop` ends a request in progress. `signed` (a device
    that requires signatures): the version's release statement and signature too, where they exist."""
    files, work = stage / "files", stage / "partial"
    deadline = time.monotonic() + seconds
    left = max_bytes

    def fetch(path: str, dest: Path, limit: int) -> int:
        return registry.fetch_artifact(
            mv.name, mv.version, path, dest, work, max_bytes=limit, deadline=deadline, stop=stop
        )

    left -= fetch(MLMODEL, files / MLMODEL, min(MAX_MLMODEL_BYTES, left))
    model = own_variant(files)
    required = [name for name in dict.fromkeys(model.files()) if name not in (MLMODEL, *ENVIRONMENT_FILES)]
    optional = [name for name in ENVIRONMENT_FILES if name not in required]
    if len(required) > MAX_FILES:
        raise InvalidInputError(f"MLmodel of version {mv.version} names {len(required)} files, over {MAX_FILES}")
    for name in required + optional:
        check_artifact_path(name)
    for name in required:
        left -= fetch(name, files / name, left)
    for name in optional:
        try:
            left -= fetch(name, files / name, left)
        except ModelNotFoundError:
            pass
    if signed:
        left -= _fetch_signature(fetch, mv, files, left)
    example = _example_path(model.mlmodel)
    if example is not None:
        try:
            fetch(example, stage / EXAMPLE, MAX_EXAMPLE_BYTES)
        except ModelNotFoundError:
            pass
    return files


def own_variant(files: Path) -> ArachneModel:
    """The model MLmodel in `files` describes, narrowed to the variant this device runs (chosen as the
    host would choose for it, from what its `GET /v2` reports): only that variant's files are fetched.
    `IncompatibleModelError` naming what each variant needs when this device runs none."""
    from arachne_mlflow.server.dataplane import available_runtimes  # (the server's own report of itself)

    device = {"arch": machine_arch(), "runtimes": available_runtimes()}
    model = read_model_dir(files, check_files=False, device=device)
    if model.choice is not None:
        model.choice.required(f"this device ({device['arch']})")
    return model


def _fetch_signature(fetch: Any, mv: ModelVersion, files: Path, left: int) -> int:
    """The release statement and signature stored for this registered version (flavors/signing.py), each
    under its own bound, beside the model's files; an unsigned version has none (the store refuses it)."""
    folder = signature_artifact_path(mv.name, mv.version)
    size = 0
    for file, limit in ((RELEASE_FILE, MAX_RELEASE_BYTES), (SIGNATURE_FILE, MAX_SIGNATURE_BYTES)):
        try:
            size += fetch(f"{folder}/{file}", files / file, min(limit, left - size))
        except ModelNotFoundError:
            pass
    return size


def check_artifact_path(path: str) -> str:
    """A file name from a downloaded MLmodel: relative, short, plain characters in every part (an allow-list)."""
    parts = PurePosixPath(path).parts
    if not parts or len(path) > 1024 or len(parts) > 16 or not all(_PATH_PART.match(part) for part in parts):
        raise InvalidInputError(
            f"MLmodel names the file {path[:200]!r}: a following device takes relative names of letters, digits "
            "and '_.+ -' only"
        )
    return path


def _example_path(mlmodel: Mapping[str, Any]) -> str | None:
    info = mlmodel.get("saved_input_example_info")
    path = info.get("artifact_path") if isinstance(info, dict) else None
    if not isinstance(path, str):
        return None
    return check_artifact_path(path)
