"""The record of a stored model (`<name>/CURRENT.json`): read, checked, and written so a crash keeps it whole.

A record names the served version's directory and says where it came from; it also holds the
record of the version it replaced (`previous`), kept for rollback, so one atomic rename switches
both. Provenance comes from the network: it is checked (a small, shallow object of finite JSON
values) before anything of an upload is written, so a record can always be written and served.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arachne_mlflow.errors import InsufficientStorageError, InvalidInputError

if TYPE_CHECKING:
    from arachne_mlflow.model.directory import ArachneModel
from arachne_mlflow.model.digest import tree_files

_logger = logging.getLogger(__name__)

CURRENT = "CURRENT.json"
MAX_PROVENANCE_BYTES = 16 * 1024
MAX_PROVENANCE_DEPTH = 8
# What `GET /v2/repository/models/{m}` shows of a kept previous version.
PREVIOUS_KEYS = ("revision", "runtime", "variant", "digest", "bytes", "uploaded_at", "provenance")
# Record keys an earlier release wrote under other names.
_RENAMED_KEYS = (("version", "revision"), ("info", "provenance"))
# Errors that mean the storage cannot hold what is being written.
_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def check_provenance(provenance: Any, where: str = "provenance") -> dict[str, Any]:
    """`provenance` if it is a JSON object of finite values, at most 8 levels deep and 16 KiB written."""
    if provenance is None:
        return {}
    if not isinstance(provenance, dict):
        raise InvalidInputError(f"{where} must be a JSON object")
    _check_json_value(provenance, where, 0)
    if len(json.dumps(provenance)) > MAX_PROVENANCE_BYTES:
        raise InvalidInputError(f"{where} is longer than {MAX_PROVENANCE_BYTES} bytes")
    return provenance


def _check_json_value(value: Any, where: str, depth: int) -> None:
    if depth > MAX_PROVENANCE_DEPTH:
        raise InvalidInputError(f"{where} nests deeper than {MAX_PROVENANCE_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where}: keys must be strings, got {key!r:.40}")
            _check_json_value(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_value(item, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(f"{where}: {value} is not a JSON number (numbers must be finite)")
    elif value is not None and not isinstance(value, (str, int, float)):
        raise InvalidInputError(f"{where}: {type(value).__name__} is not a JSON value")


def read_record(directory: Path) -> dict[str, Any] | None:
    """The record in `directory`, or None when there is none whose version directory exists.

    A `previous` whose directory is gone (or is the served one) is dropped.
    """
    try:
        record = json.loads((directory / CURRENT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not (directory / str(record.get("version_dir"))).is_dir():
        return None
    for old, new in _RENAMED_KEYS:  # a record written by 0.1.0
        if old in record and new not in record:
            record[new] = record.pop(old)
    previous = record.get("previous")
    if previous is not None and not (
        isinstance(previous, dict)
        and previous.get("version_dir") not in (None, record["version_dir"])
        and (directory / str(previous["version_dir"])).is_dir()
    ):
        del record["previous"]
    for kept in (record, record.get("previous")):
        if kept is not None and "bytes" not in kept:  # written before records counted their bytes
            kept["bytes"] = version_bytes(directory / kept["version_dir"])
    return record


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as clients see it: without directory names, with a summary of the kept previous version."""
    result = {k: v for k, v in record.items() if k not in ("version_dir", "previous")}
    previous = record.get("previous")
    result["previous"] = {k: previous.get(k) for k in PREVIOUS_KEYS if k in previous} if previous else None
    return result


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """Replace `directory/CURRENT.json` by `record` so that a crash leaves either the old or the new one, whole.

    The rename is the commit: a failure before it leaves the old record and no temporary file.
    """
    text = json.dumps(record, allow_nan=False)
    temporary = directory / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, directory / CURRENT)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        sync_directory(directory)
    except OSError as err:  # the rename is done; only its durability across a power cut is in doubt
        _logger.warning("could not sync %s after writing its record: %s", directory, err)


def version_bytes(path: Path) -> int:
    """Bytes of the files of a stored version."""
    return sum((path / name).stat().st_size for name in tree_files(path))


def storage_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _STORAGE_FULL


def storage_error(err: OSError, root: Path, name: str) -> InsufficientStorageError:
    return InsufficientStorageError(
        f"the device's storage is full ({os.strerror(err.errno)}, model store {root}): model {name!r} was not "
        "changed and nothing of this request was kept; free space on the device or delete models, then retry"
    )


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        elif path.is_dir():
            sync_directory(path)
    sync_directory(root)
    sync_directory(root.parent)


def sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def version_dirs(record: dict[str, Any]) -> list[str]:
    return [record["version_dir"], *([record["previous"]["version_dir"]] if record.get("previous") else [])]


def without_previous(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "previous"}


def variant_of(model: ArachneModel) -> dict[str, str]:
    """`{"variant": name}` for a model with variants (the one whose files the store holds), else {}."""
    return {"variant": model.variant_name} if model.has_variants else {}


def next_revision(record: dict[str, Any]) -> int:
    """One more than any revision kept (after a rollback the served one is not the highest)."""
    return max(record["revision"], (record.get("previous") or {}).get("revision", 0)) + 1


def remove_all_but(directory: Path, keep: set[str]) -> None:
    """Start-up cleanup: interrupted uploads, temporary records, versions no record names."""
    for leftover in directory.iterdir():
        if leftover.name in keep:
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink()


MARKER = ".arachne-model-store"


def claim_store_dir(root: Path) -> Path:
    """`root`, made a model store (the marker file) if it is new or empty; a non-empty directory
    without the marker is refused: start-up cleanup removes unknown directories, never do that to
    someone's own files."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).is_file():
        if any(root.iterdir()):
            raise InvalidInputError(
                f"{root} is not empty and is not a model store (no {MARKER} file): "
                "give the server a new or empty directory"
            )
        (root / MARKER).write_text("arachne-mlflow device server model store\n")
    return root
