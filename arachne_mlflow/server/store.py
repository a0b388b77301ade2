"""The model store: named MLflow model directories on disk, each loaded with the unified runtime.

Layout, chosen so that a crash at any moment leaves every model at its last complete version:

    <root>/.arachne-model-store  marks the directory as a store (a non-empty one without it is refused)
    <root>/<name>/CURRENT.json   the served version's record (replaced atomically)
    <root>/<name>/v-<id>/        a complete model directory (MLmodel and its files)
    <root>/<name>/.incoming-<id> an upload being extracted (removed at start-up)

An upload is extracted beside the served version, loaded, synced to disk, and only then made
current by replacing CURRENT.json (a pointer file, so the swap is one atomic rename); until that
moment the old version keeps serving, and if anything fails the new files are removed and nothing
else changes. Calls are blocking: the dataplane runs
them in its thread pool. Operations on one name are serialized; other names are not held up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from arachne_mlflow import runtime
from arachne_mlflow.errors import ArachneError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from arachne_mlflow.model.archive import safe_extract
from arachne_mlflow.model.digest import files_digest, tree_files
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.protocol.names import NAME_PATTERN, check_name
from arachne_mlflow.runtime import RuntimeModule
from arachne_mlflow.server.batching import Batcher, BatchingPolicy, BatchingSettings
from arachne_mlflow.server.probe import probe_load

_logger = logging.getLogger(__name__)

CURRENT = "CURRENT.json"
MARKER = ".arachne-model-store"
DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
# Option names that point a DNN library at files (paths, profiles, caches): refused in uploaded models.
# Record keys an earlier release wrote under other names.
_RENAMED_KEYS = (("version", "revision"), ("info", "provenance"))
_FILE_OPTION = re.compile(r"file|path|dir|prefix|profil|cache|dump", re.IGNORECASE)


class LoadedModel:
    """A loaded runtime module that is freed only when the last inference using it has finished.

    `batching` is how its requests are batched (None: each runs alone); the dataplane makes its
    `batcher` when the first request comes.
    """

    def __init__(
        self,
        module: RuntimeModule,
        record: dict[str, Any],
        load_seconds: float,
        batching: BatchingSettings | None = None,
    ):
        self.module = module
        self.record = record
        self.load_seconds = load_seconds
        self.batching = batching
        self.batcher: Batcher | None = None
        self.revision = str(record["revision"])
        self.input_names = [spec.name for spec in module.input_specs]
        self.output_names = [spec.name for spec in module.output_specs]
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        """Hold the module for one use; False once it is retired (look the model up again)."""
        with self._lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            free = self._retired and self._users == 0
        if free:
            self.module.done()

    def retire(self) -> None:
        """Free the module now, or after the inferences still running on it finish."""
        with self._lock:
            self._retired = True
            free = self._users == 0
        if free:
            self.module.done()


@dataclass
class _Entry:
    record: dict[str, Any]
    loaded: LoadedModel | None = None
    reason: str = ""


class ModelStore:
    """Named models kept under `root`, loaded again when the store opens."""

    def __init__(
        self,
        root: str | os.PathLike,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        batching: BatchingPolicy | None = None,
    ):
        self.batching = batching or BatchingPolicy()
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            if any(self.root.iterdir()):
                # start-up cleanup removes unknown directories: never do that to someone's own files
                raise InvalidInputError(
                    f"{self.root} is not empty and is not a model store (no {MARKER} file): "
                    "give the server a new or empty directory"
                )
            (self.root / MARKER).write_text("arachne-mlflow device server model store\n")
        self.max_upload_bytes = max_upload_bytes
        self._entries: dict[str, _Entry] = {}
        self._name_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # -- start-up and shut-down ------------------------------------------------------------
    def open(self) -> None:
        """Clean up interrupted uploads and load every stored model; a failed load is recorded, not fatal."""
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            name = directory.name
            if not NAME_PATTERN.match(name):
                continue
            record = _read_record(directory)
            if record is None:
                _logger.warning("removing %s: an upload that never completed", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            for leftover in directory.iterdir():
                if leftover.name in (CURRENT, record["version_dir"]):
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
            entry = _Entry(record)
            self._entries[name] = entry
            try:
                entry.loaded = self._load(_read_checked(directory / record["version_dir"]), record)
            except ArachneError as err:
                entry.reason = str(err)
                _logger.error("model %r did not load: %s", name, err)

    def close(self) -> None:
        with self._guard:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.loaded is not None:
                entry.loaded.retire()
                entry.loaded = None

    # -- queries ---------------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        """The loaded model `name`; 404 if unknown, 503 if not loaded."""
        entry = self._entry(name)
        loaded = entry.loaded
        if loaded is None:
            reason = f": {entry.reason}" if entry.reason else " (unloaded)"
            raise ModelNotReadyError(f"model {name!r} is not loaded{reason}")
        return loaded

    def acquire(self, name: str) -> LoadedModel:
        """The loaded model `name`, held until its `release()` even if it is replaced meanwhile.

        The hot path of every inference: one dict look-up and the model's own lock, no store lock
        (a model retired between the look-up and the hold is looked up again).
        """
        entry = self._entries.get(name)
        if entry is not None:
            loaded = entry.loaded
            if loaded is not None and loaded.try_acquire():
                return loaded
        loaded = self.get(name)  # raises the right error: unknown (404) or not loaded (503)
        if loaded.try_acquire():  # replaced just now: this is the new version
            return loaded
        raise ModelNotReadyError(f"model {name!r} is being replaced: try again")

    @contextmanager
    def use(self, name: str) -> Iterator[LoadedModel]:
        """`acquire` and `release` around a block."""
        loaded = self.acquire(name)
        try:
            yield loaded
        finally:
            loaded.release()

    def record(self, name: str) -> dict[str, Any]:
        """The stored record of `name` (revision, runtime, digest, provenance...) with its state."""
        entry = self._entry(name)
        record = {k: v for k, v in entry.record.items() if k != "version_dir"}
        record["state"] = "READY" if entry.loaded is not None else "UNAVAILABLE"
        if entry.reason:
            record["reason"] = entry.reason
        return record

    def index(self) -> list[dict[str, Any]]:
        """Every stored model, V2 repository-index style."""
        with self._guard:
            names = sorted(self._entries)
        result = []
        for name in names:
            try:
                record = self.record(name)
            except ModelNotFoundError:
                continue
            result.append(
                {
                    "name": name,
                    "version": str(record["revision"]),
                    "state": record["state"],
                    "reason": record.get("reason", ""),
                }
            )
        return result

    def spec(self, name: str) -> tuple[dict[str, Any], list, list]:
        """The record and the input/output specs of `name`, from the loaded module or MLmodel."""
        entry = self._entry(name)
        if entry.loaded is not None:
            module = entry.loaded.module
            return entry.record, module.input_specs, module.output_specs
        model = read_model_dir(self.root / name / entry.record["version_dir"])
        return entry.record, model.inputs, model.outputs

    # -- changes ---------------------------------------------------------------------------
    def put(self, name: str, stream: BinaryIO, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store the tar `stream` of an MLflow model dir as `name`, load it, then make it current."""
        check_name(name)
        with self._name_lock(name):
            directory = self.root / name
            directory.mkdir(exist_ok=True)
            version_dir = f"v-{uuid.uuid4().hex[:12]}"
            incoming = directory / f".incoming-{version_dir}"
            try:
                safe_extract(stream, incoming, max_bytes=self.max_upload_bytes)
                os.rename(incoming, directory / version_dir)
                model = _read_checked(directory / version_dir)  # before anything loads it
                previous = self._entries.get(name)
                record = {
                    "name": name,
                    "revision": (previous.record["revision"] + 1) if previous else 1,
                    "version_dir": version_dir,
                    "runtime": model.runtime,
                    "digest": files_digest(directory / version_dir, tree_files(directory / version_dir)),
                    "uploaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "provenance": provenance or {},
                }
                probe_load(directory / version_dir, name)
                loaded = self._load(model, record)
                _sync_tree(directory / version_dir)  # on disk before CURRENT.json names it (power cuts)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                shutil.rmtree(directory / version_dir, ignore_errors=True)
                if name not in self._entries:
                    shutil.rmtree(directory, ignore_errors=True)
                raise
            _write_record(directory, record)
            with self._guard:
                old = self._entries.get(name)
                self._entries[name] = _Entry(record, loaded)
            if old is not None:
                if old.loaded is not None:
                    old.loaded.retire()
                shutil.rmtree(directory / old.record["version_dir"], ignore_errors=True)
            return self.record(name)

    def delete(self, name: str) -> None:
        with self._name_lock(name):
            self._entry(name)
            with self._guard:
                entry = self._entries.pop(name)
            (self.root / name / CURRENT).unlink()
            if entry.loaded is not None:
                entry.loaded.retire()
            shutil.rmtree(self.root / name, ignore_errors=True)

    def load(self, name: str) -> LoadedModel:
        """Load `name` again from disk (a no-op when it is loaded)."""
        with self._name_lock(name):
            entry = self._entry(name)
            if entry.loaded is None:
                try:
                    loaded = self._load(_read_checked(self.root / name / entry.record["version_dir"]), entry.record)
                except ArachneError as err:
                    entry.reason = str(err)
                    raise
                with self._guard:
                    entry.loaded, entry.reason = loaded, ""
            return entry.loaded

    def unload(self, name: str) -> None:
        with self._name_lock(name):
            entry = self._entry(name)
            with self._guard:
                loaded, entry.loaded = entry.loaded, None
            if loaded is not None:
                loaded.retire()

    # -- helpers ---------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        check_name(name)
        with self._guard:
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model {name!r} on this server; models: {sorted(self._entries)}")
        return entry

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def _load(self, model: ArachneModel, record: dict[str, Any]) -> LoadedModel:
        start = time.perf_counter()
        try:
            module = runtime.load(model)
        except ArachneError:
            raise
        except Exception as err:  # a DNN library's own error for a corrupt or foreign model file
            raise InvalidInputError(f"model {record['name']!r} cannot be loaded: {err}") from err
        try:
            batching = self.batching.settings_for(
                record["name"], model.batching, module.input_specs, module.output_specs
            )
        except ArachneError:
            module.done()
            raise
        return LoadedModel(module, record, time.perf_counter() - start, batching)


def _read_checked(path: Path) -> ArachneModel:
    """The model at `path`, refused if its runtime options would make a library write files."""
    model = read_model_dir(path)
    _refuse_file_options(model.runtime_options, "runtime_options")
    return model


def _refuse_file_options(options: Any, where: str) -> None:
    """Refuse runtime options that name files (onnxruntime's `optimized_model_filepath`, profiling
    output...): an uploaded MLmodel could make the library write or read any path the server can."""
    if isinstance(options, dict):
        for key, value in options.items():
            if _FILE_OPTION.search(str(key)):
                raise InvalidInputError(
                    f"{where}.{key}: a model on a device server may not set options that name files or turn on "
                    "profiling (they would reach outside the model store)"
                )
            _refuse_file_options(value, f"{where}.{key}")
    elif isinstance(options, list):
        for index, value in enumerate(options):
            _refuse_file_options(value, f"{where}[{index}]")


def _read_record(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / CURRENT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not (directory / str(record.get("version_dir"))).is_dir():
        return None
    for old, new in _RENAMED_KEYS:  # a record written by 0.1.0
        if old in record and new not in record:
            record[new] = record.pop(old)
    return record


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    """Write CURRENT.json so that a crash leaves either the old or the new record, whole."""
    temporary = directory / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    with open(temporary, "w") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, directory / CURRENT)
    _sync_directory(directory)


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        elif path.is_dir():
            _sync_directory(path)
    _sync_directory(root)
    _sync_directory(root.parent)


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
