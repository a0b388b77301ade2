"""Where a pulled model is verified: every check a registry version passes before the device serves it.

In order, each refusing the version (the old one keeps serving):

0. With `serve --trust-key`, a release of the followed registered model older than the signed one
   served is refused before anything is downloaded (no silent downgrade by a registry writer).
1. `download.download_version`: MLmodel, then only the files it names; every name against an
   allow-list, the total under the store's upload cap, one try within a deadline; with trusted
   keys also the version's release statement and signature, which are verified
   (server/signatures.py) before anything reads the model.
2. `loading.read_checked`: an upload's checks: the runtime options are ones its backend lets an
   uploaded model set, and this machine can run the model.
3. `smoke.smoke_check`: a child process loads it and runs one inference under the smoke policy
   (model/smoke_policy.py: the saved input example where it fits), its outputs checked against
   the signature; a crash kills the child, not the server.
4. `ModelStore.put`, exactly as an upload: safe extraction, the same checks again, a child's
   load (`probe.probe_load`), the batching declaration, the load in the server, a sync to disk,
   and only then one atomic rename that makes it the served version.

A version the store keeps as the previous one (a staged rollout moved back, protocol/staged_pull.py)
is served again by the store's rollback after step 0: no download, and the store checks it as it
checks any rollback (its signature where signatures are required).
"""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import ModelNotFoundError, UntrustedModelError
from arachne_mlflow.model.archive import stream_tar
from arachne_mlflow.model.digest import tree_files
from arachne_mlflow.server.loading import read_checked
from arachne_mlflow.server.pull.download import EXAMPLE, download_version
from arachne_mlflow.server.pull.registry_client import ModelRef, ModelVersion, RegistryClient
from arachne_mlflow.server.pull.smoke import smoke_check
from arachne_mlflow.server.signatures import DOWNGRADE
from arachne_mlflow.server.store import ModelStore


def install_version(
    name: str,
    ref: ModelRef,
    mv: ModelVersion,
    store: ModelStore,
    registry: RegistryClient,
    directory: Path,
    seconds: float,
    stop: threading.Event,
) -> dict[str, Any]:
    """Download version `mv` into `directory/v<version>` (within `seconds`), check and smoke-test it,
    then install it in `store` as `name`; returns the store's record. Other versions' downloads go."""
    stage = directory / f"v{mv.version}"
    for other in directory.iterdir():
        if other.is_dir() and other != stage:
            shutil.rmtree(other, ignore_errors=True)
    check_not_older(name, mv, store)
    if _kept_as_previous(name, mv, store):
        return store.rollback(name)
    signed = store.signatures.required
    files = download_version(registry, mv, stage, store.max_upload_bytes, seconds, stop, signed=signed)
    store.signatures.verify(name, files, {"registered_model": mv.name, "version": mv.version})
    model = read_checked(files)  # an upload's checks (its runtime options...) before a child loads it
    example = stage / EXAMPLE
    smoke_check(files, name, example if example.is_file() else None)
    provenance = {
        "model_uri": ref.uri,
        "registered_model": mv.name,
        "version": mv.version,
        "alias": ref.alias,
        "run_id": mv.run_id or model.mlmodel.get("run_id"),
        "model_id": model.mlmodel.get("model_id") or _logged_model_id(mv.source),
    }
    provenance = {k: v for k, v in provenance.items() if v is not None}
    tar = io.BufferedReader(_ChunkReader(stream_tar(files, tree_files(files))), 1 << 16)
    record = store.put(name, tar, provenance)
    shutil.rmtree(stage, ignore_errors=True)
    return record


def check_not_older(name: str, mv: ModelVersion, store: ModelStore) -> None:
    """A device that requires signatures does not pull a release of its registered model older than the
    signed one it serves: a registry writer cannot downgrade it silently (an operator can push one with
    the token, or follow a pinned version)."""
    if not store.signatures.required:
        return
    try:
        served = store.record(name).get("signature") or {}
    except ModelNotFoundError:
        return
    if served.get("registered_model") == mv.name and int(mv.version) < int(served.get("version", 0)):
        err = UntrustedModelError(
            f"version {mv.version} of {mv.name!r} is older than the signed version {served['version']} this device "
            "serves: a following device does not downgrade (push the older version with the token to do so)"
        )
        store.signatures.refused(name, err, DOWNGRADE)
        raise err


def _kept_as_previous(name: str, mv: ModelVersion, store: ModelStore) -> bool:
    try:
        previous = store.record(name).get("previous") or {}
    except ModelNotFoundError:
        return False
    provenance = previous.get("provenance") or {}
    return (provenance.get("registered_model"), provenance.get("version")) == (mv.name, mv.version)


class _ChunkReader(io.RawIOBase):
    """A blocking file over an iterator of byte chunks (the tar `stream_tar` makes), for `ModelStore.put`."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _logged_model_id(source: str | None) -> str | None:
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/") :]:
        return source[len("models:/") :]
    return None
