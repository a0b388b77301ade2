"""The device server's repository side: what the store holds and how that changes.

The index and each model's record, load and unload, upload, rollback and delete, over a
`ModelStore`, with their metrics; start-up (the stored models loaded, at most
`STARTUP_WAIT_SECONDS` waited for) and shut-down; and the life cycle of pull mode's followers
(server/pull/), whose models the registry owns: they cannot be uploaded, rolled back or deleted
here. The dataplane (server/dataplane.py) answers inference and metadata beside it; both run
blocking work in the dataplane's one thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from arachne_mlflow.errors import ArachneError, ConflictError, InvalidInputError, ModelNotFoundError
from arachne_mlflow.server.metrics import Metrics
from arachne_mlflow.server.probe import list_tvm_devices_in_background
from arachne_mlflow.server.store import ModelStore
from arachne_mlflow.server.upload_stream import StreamReader

if TYPE_CHECKING:
    from arachne_mlflow.server.pull.follow import FollowConfig, Follower

_logger = logging.getLogger(__name__)

#: Runs a blocking call in the dataplane's thread pool.
RunBlocking = Callable[..., Awaitable[Any]]

# An upload holds a worker thread while its body streams in: cap them so inference keeps threads.
MAX_CONCURRENT_UPLOADS = 2
# Seconds a follower may take to notice the server stops (a registry request ends at once; a smoke test or an
# install in progress runs to its end).
FOLLOWER_STOP_SECONDS = 5.0
# Seconds start-up waits for the stored models before the server answers; the rest load in the
# background (/v2/health/ready says 503 until they have), so a model whose load hangs holds up
# neither the health checks nor a SIGTERM.
STARTUP_WAIT_SECONDS = 5.0


class Repository:
    """The models a `ModelStore` holds, changed through the V2 repository routes and the extensions.

    `forget(name)` drops what serving keeps of a deleted model (its statistics).
    """

    def __init__(
        self,
        store: ModelStore,
        metrics: Metrics,
        run_blocking: RunBlocking,
        follow: FollowConfig | None = None,
        forget: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.metrics = metrics
        self.ready = False
        self.followers: dict[str, Follower] = {}
        self._run_blocking = run_blocking
        self._follow = follow
        self._forget = forget or metrics.forget
        self._uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)
        self._starting: asyncio.Task | None = None

    # -- start-up and shut-down ------------------------------------------------------------
    async def start(self) -> None:
        """List the stored models, then load them, waiting at most `STARTUP_WAIT_SECONDS` for that."""
        found = await self._run_blocking(self.store.scan)
        self._starting = asyncio.create_task(self._load_stored(found))
        await asyncio.wait({self._starting}, timeout=STARTUP_WAIT_SECONDS)

    async def _load_stored(self, found: Any) -> None:
        try:
            await self._run_blocking(self.store.load_stored, found)
        except Exception:  # the server stays up, not ready, and says why in its log
            _logger.exception("the stored models could not be loaded")
            return
        list_tvm_devices_in_background()  # for `GET /v2`, unless start-up probed a TVM model
        for entry in self.store.index():
            if entry["state"] == "READY":
                self.metrics.load_seconds.labels(entry["name"]).set(self.store.get(entry["name"]).load_seconds)
        if self._follow is not None:
            from arachne_mlflow.server.pull.follow import start_followers

            self.followers = start_followers(self._follow, self.store, self.metrics)
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        if self._starting is not None:
            self._starting.cancel()  # no followers start now; `store.close` stops the probes under way
        for follower in self.followers.values():
            follower.stop()
        for follower in self.followers.values():
            await self._run_blocking(follower.join, FOLLOWER_STOP_SECONDS)
        await self._run_blocking(self.store.close)

    # -- what is stored --------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The stored models, and followed models still waiting for their first version (UNAVAILABLE)."""
        entries = self.store.index()
        stored = {e["name"] for e in entries}
        for name, follower in sorted(self.followers.items()):
            if name not in stored:
                entries.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": _waiting(follower)})
        return [e for e in entries if e["state"] == "READY"] if ready_only else entries

    def record(self, name: str) -> dict[str, Any]:
        """The stored record; for a followed model also `follow`: what it follows, the version it runs,
        when it last checked, the last error."""
        follower = self.followers.get(name)
        if follower is None:
            return self.store.record(name)
        try:
            record = self.store.record(name)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(f"model {name!r} is not on this device yet: {_waiting(follower)}") from err
        record["follow"] = follower.status()
        return record

    def check_installed(self, name: str) -> None:
        """A followed model before its first install: a 404 that says what it follows and how that goes."""
        follower = self.followers.get(name)
        if follower is None:
            return
        try:
            self.store.record(name)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(
                f"model {name!r} is followed on this device and not installed yet (not ready): {_waiting(follower)}"
            ) from err

    # -- changes ---------------------------------------------------------------------------
    def check_load_parameters(self, parameters: dict[str, Any]) -> None:
        """Triton's load may carry a new configuration or model files: refused (upload the model instead)."""
        for key in parameters:
            if key == "config" or key.startswith("file:"):
                raise InvalidInputError(
                    f"load parameter {key!r} is not supported: a model changes by uploading it "
                    "(PUT /v2/repository/models/{name}); load only loads the stored model again"
                )

    async def load(self, name: str) -> None:
        loaded = await self._run_blocking(self.store.load, name)
        self.metrics.load_seconds.labels(name).set(loaded.load_seconds)

    async def unload(self, name: str) -> None:
        await self._run_blocking(self.store.unload, name)

    async def rollback(self, name: str) -> dict[str, Any]:
        self._refuse_followed(name, "rolled back")
        record = await self._run_blocking(self.store.rollback, name)
        self._record_load_seconds(name)
        return record

    async def delete(self, name: str) -> None:
        self._refuse_followed(name, "deleted")
        await self._run_blocking(self.store.delete, name)
        self._forget(name)

    async def upload(
        self, name: str, chunks: AsyncIterator[bytes], provenance: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Extract the tar arriving in `chunks` into the store as it streams in, then load it.

        A refused upload is not read any further (the route closes the connection); an accepted
        one is read to its end (a tar's trailing padding), up to the upload cap.
        """
        reader = StreamReader(chunks, asyncio.get_running_loop(), self.store.max_upload_bytes)
        self._refuse_followed(name, "uploaded")
        async with self._uploads:
            record = await self._run_blocking(self.store.put, name, io.BufferedReader(reader, 1 << 16), provenance)
        await reader.drain()
        self._record_load_seconds(name)
        return record

    def _record_load_seconds(self, name: str) -> None:
        with contextlib.suppress(ArachneError):  # unloaded again meanwhile: nothing to record
            self.metrics.load_seconds.labels(name).set(self.store.get(name).load_seconds)

    def _refuse_followed(self, name: str, what: str) -> None:
        follower = self.followers.get(name)
        if follower is not None:
            raise ConflictError(
                f"model {name!r} follows {follower.ref.uri} on this device (serve --follow): it cannot be {what} "
                "here; move the alias in the registry instead"
            )


def _waiting(follower: Follower) -> str:
    status = follower.status()
    text = f"it follows {status['model_uri']} ({status['state']}"
    if status["last_check"]:
        text += f", last checked {status['last_check']}"
    if status["last_error"]:
        text += f"; last error: {status['last_error']}"
    return text + ")"
