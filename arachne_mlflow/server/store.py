"""The model store: named MLflow model directories on disk, each loaded with the unified runtime.

Layout, chosen so that a crash at any moment leaves every model at its last complete version:

    <root>/.arachne-model-store  marks the directory as a store (a non-empty one without it is refused)
    <root>/<name>/CURRENT.json   the served version's record, with the previous one's (records.py)
    <root>/<name>/v-<id>/        a complete model directory (MLmodel and its files): the served version,
                                 and the version it replaced, kept for an instant rollback
    <root>/<name>/.incoming-<id> an upload being extracted (removed at start-up)

An upload is extracted beside the served version, its options checked, loaded once in a child
process (probe.py), loaded, synced to disk, and only then made current by replacing CURRENT.json
(one atomic rename); the version it replaced becomes the previous one, and the one before that is
deleted. Until the rename the old version keeps serving; if anything fails, everything of the
upload is removed at once and nothing else changes (a full disk is a 507). A rollback swaps the
served and the previous version the same way. At start-up every stored model is loaded in child
processes first, so one that crashes its process is quarantined (UNAVAILABLE, with the reason)
instead of taking the server down at every start. Which loads need a child first: loading.py.

Calls are blocking: the dataplane runs them in its thread pool. Operations on one name are
serialized; other names are not held up.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from arachne_mlflow.errors import ArachneError, ConflictError, ModelNotFoundError, ModelNotReadyError
from arachne_mlflow.model.archive import safe_extract
from arachne_mlflow.model.digest import tree_digest
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.model.names import NAME_PATTERN, check_name
from arachne_mlflow.server.batching import BatchingPolicy
from arachne_mlflow.server.loading import LoadedModel, Loader, ServingCheck, read_checked
from arachne_mlflow.server.name_locks import NameLocks
from arachne_mlflow.server.probe import probe_many
from arachne_mlflow.server.records import (
    CURRENT,
    check_provenance,
    claim_store_dir,
    next_revision,
    public_record,
    read_record,
    remove_all_but,
    storage_error,
    storage_full,
    sync_tree,
    variant_of,
    version_bytes,
    version_dirs,
    without_previous,
    write_record,
)
from arachne_mlflow.server.settings import DEFAULT_MAX_UPLOAD_BYTES
from arachne_mlflow.server.signatures import SignaturePolicy

_logger = logging.getLogger(__name__)

QUARANTINED = "it is quarantined (not loaded): delete it, upload another version or roll it back"
STARTING = "the server is starting: it is being loaded"


@dataclass
class _Entry:
    record: dict[str, Any]
    loaded: LoadedModel | None = None
    reason: str = ""


class ModelStore:
    """Named models kept under `root`, loaded again when the store opens.

    `serving` is the serving side's say on each model as it loads (server/batching.py's policy, which
    the dataplane owns): a model it refuses is refused like one that does not load. Without it, only
    each model's own declaration counts (a store used without a server: tests, `run-local`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        serving: ServingCheck | None = None,
        signatures: SignaturePolicy | None = None,
    ):
        self.signatures = signatures or SignaturePolicy()  # `serve --trust-key`: the keys, the refusals
        self.root = claim_store_dir(Path(root).resolve())
        self.max_upload_bytes = max_upload_bytes
        self._entries: dict[str, _Entry] = {}
        self._name_locks = NameLocks()  # only while an operation on the name runs or waits
        self._guard = threading.Lock()
        self._stopping = threading.Event()  # set by `close`: probes under way stop, start-up loads no more
        self._loader = Loader(serving or BatchingPolicy().settings_for, self._stopping)

    # -- start-up and shut-down ------------------------------------------------------------
    def open(self) -> None:
        """`scan` then `load_stored`: every stored model loaded (or quarantined) when it returns."""
        self.load_stored(self.scan())

    def scan(self) -> dict[str, _Entry]:
        """Clean up interrupted uploads and list the stored models (UNAVAILABLE until `load_stored`).

        Quick (no model loads): a server runs it before it takes requests, so that no upload can
        start in a directory this cleanup removes.
        """
        found: dict[str, _Entry] = {}
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            name = directory.name
            if not NAME_PATTERN.match(name):
                continue
            record = read_record(directory)
            if record is None:
                _logger.warning("removing %s: an upload that never completed", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            remove_all_but(directory, {CURRENT, *version_dirs(record)})
            found[name] = _Entry(record, reason=STARTING)
        with self._guard:
            self._entries.update(found)
        return found

    def load_stored(self, found: dict[str, _Entry]) -> None:
        """Load the models `scan` found, each first in a child process (a model that fails or
        crashes there is UNAVAILABLE with its reason). Each name is held meanwhile, so a change
        to it waits; one that came first (a delete, an upload) is left alone."""
        with ExitStack() as held:
            for name in sorted(found):
                held.enter_context(self._name_locks.hold(name))
            found = {name: entry for name, entry in found.items() if self._entries.get(name) is entry}
            checked: dict[str, ArachneModel] = {}
            for name, entry in found.items():
                try:
                    self._verify_signature(name, entry.record)
                    checked[name] = read_checked(self.root / name / entry.record["version_dir"])
                except ArachneError as err:
                    self._failed(name, err)
            probed = probe_many(checked, QUARANTINED, stop=self._stopping)
            for name, error in probed.items():
                if self._stopping.is_set():
                    return
                try:
                    if error is not None:
                        raise error
                    loaded = self._loader.load(checked[name], found[name].record)
                except ArachneError as err:
                    self._failed(name, err)
                    continue
                with self._guard:
                    found[name].loaded, found[name].reason = loaded, ""

    def close(self) -> None:
        """Free every model; a start-up still probing models stops (its children are killed)."""
        self._stopping.set()
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
        """The stored record of `name` (revision, runtime, digest, bytes, provenance, the kept previous
        version...) with its state."""
        entry = self._entry(name)
        record = public_record(entry.record)
        record["state"] = "READY" if entry.loaded is not None else "UNAVAILABLE"
        if entry.reason:
            record["reason"] = entry.reason
        if self.signatures.required:
            record["signatures_required"] = True
        refusals = self.signatures.refusals(name)
        if refusals:
            record["refusals"] = refusals
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
            reason = record.get("reason", "")
            result.append(
                {"name": name, "version": str(record["revision"]), "state": record["state"], "reason": reason}
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
        provenance = check_provenance(provenance)
        with self._name_locks.hold(name):
            directory = self.root / name
            directory.mkdir(exist_ok=True)
            version_dir = f"v-{uuid.uuid4().hex[:12]}"
            incoming = directory / f".incoming-{version_dir}"
            loaded = None
            try:
                safe_extract(stream, incoming, max_bytes=self.max_upload_bytes)
                os.rename(incoming, directory / version_dir)
                verified = self.signatures.verify(name, directory / version_dir, provenance)  # before anything reads it
                model = read_checked(directory / version_dir)  # before anything loads it
                replaced = self._entries.get(name)
                record = {
                    "name": name,
                    "revision": next_revision(replaced.record) if replaced else 1,
                    "version_dir": version_dir,
                    "runtime": model.runtime,
                    "digest": verified.digest if verified else tree_digest(directory / version_dir),
                    "bytes": version_bytes(directory / version_dir),
                    "uploaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "provenance": provenance,
                    **variant_of(model),
                }
                if verified is not None:
                    record["signature"] = verified.signature
                if replaced is not None:
                    record["previous"] = without_previous(replaced.record)
                loaded = self._loader.load_proven(
                    model, record, "it was not installed", digest=record["digest"], smoke=True
                )
                sync_tree(directory / version_dir)  # on disk before CURRENT.json names it (power cuts)
                write_record(directory, record)
            except BaseException as err:
                if loaded is not None:
                    loaded.retire()
                shutil.rmtree(incoming, ignore_errors=True)
                shutil.rmtree(directory / version_dir, ignore_errors=True)
                if name not in self._entries:
                    shutil.rmtree(directory, ignore_errors=True)
                if storage_full(err):
                    raise storage_error(err, self.root, name) from err
                raise
            old = self._install(name, record, loaded)
            if old is not None and old.record.get("previous"):  # a third version arrived: drop the oldest
                shutil.rmtree(directory / old.record["previous"]["version_dir"], ignore_errors=True)
            return self.record(name)

    def rollback(self, name: str) -> dict[str, Any]:
        """Serve the version the last upload replaced again (the served one becomes the previous one).

        Atomic like an upload: the served version keeps serving until the previous one has loaded,
        and a failed rollback changes nothing. 409 when no previous version is kept.
        """
        with self._name_locks.hold(name):
            entry = self._entry(name)
            previous = entry.record.get("previous")
            if previous is None:
                raise ConflictError(
                    f"model {name!r} has no previous version on this server to roll back to "
                    "(the version an upload replaces is kept until the next upload or a delete)"
                )
            directory = self.root / name
            record = {**previous, "previous": without_previous(entry.record)}
            loaded = None
            try:
                self._verify_signature(name, previous)
                model = read_checked(directory / previous["version_dir"])
                loaded = self._loader.load_proven(model, record, "the rollback changed nothing")
                write_record(directory, record)
            except BaseException as err:
                if loaded is not None:
                    loaded.retire()
                if storage_full(err):
                    raise storage_error(err, self.root, name) from err
                raise
            self._install(name, record, loaded)
            return self.record(name)

    def delete(self, name: str) -> None:
        """Remove `name`: its served version, its previous one, its record."""
        with self._name_locks.hold(name):
            self._entry(name)
            with self._guard:
                entry = self._entries.pop(name)
            (self.root / name / CURRENT).unlink()
            if entry.loaded is not None:
                entry.loaded.retire()
            shutil.rmtree(self.root / name, ignore_errors=True)

    def load(self, name: str) -> LoadedModel:
        """Load `name` again from disk (a no-op when it is loaded); first in a child unless it loaded here before."""
        with self._name_locks.hold(name):
            entry = self._entry(name)
            if entry.loaded is None:
                try:
                    self._verify_signature(name, entry.record)
                    model = read_checked(self.root / name / entry.record["version_dir"])
                    # a model that failed or crashed is loaded in a child first, even if its files loaded here before
                    loaded = self._loader.load_proven(model, entry.record, QUARANTINED, trusted=not entry.reason)
                except ArachneError as err:
                    entry.reason = str(err)
                    raise
                with self._guard:
                    entry.loaded, entry.reason = loaded, ""
            return entry.loaded

    def unload(self, name: str) -> None:
        with self._name_locks.hold(name):
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
            raise ModelNotFoundError(  # (Triton's words too: its example clients look for them)
                f"no model {name!r} on this server (Request for unknown model: '{name}' is not found); "
                f"models: {sorted(self._entries)}"
            )
        return entry

    def _install(self, name: str, record: dict[str, Any], loaded: LoadedModel) -> _Entry | None:
        """Serve `loaded` as `name` (its record already on disk); the version it replaces is freed
        once the inferences still running on it finish."""
        with self._guard:
            old = self._entries.get(name)
            self._entries[name] = _Entry(record, loaded)
        if old is not None and old.loaded is not None:
            old.loaded.retire()
        return old

    def _verify_signature(self, name: str, record: dict[str, Any]) -> None:
        """A stored version (served or kept for rollback) checked against its signature again before it
        loads, with trusted keys: a file changed on disk since it was installed refuses it."""
        self.signatures.verify(name, self.root / name / record["version_dir"], record.get("provenance"))

    def _failed(self, name: str, err: Exception) -> None:
        self._entries[name].reason = str(err)
        _logger.error("model %r did not load: %s", name, err)
