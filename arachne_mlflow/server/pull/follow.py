"""Pull mode: keep a served model at the version a registry alias (or a pinned version) names.

`serve --follow NAME=models:/REGISTERED@ALIAS` runs one `Follower` thread per NAME. It polls the
tracking server (each wait between half the interval and the interval, so a fleet does not poll
in step; backed off while the server is unreachable) and, when the alias names a version the
device does not run:

1-3. downloads, verifies and installs it (install.py: the download, an upload's checks, a smoke
   inference in a child process, then `ModelStore.put` exactly like an upload: the old version
   serves until the new one has loaded);
4. records its state on its own run in the fleet experiment (report.py, protocol/device_records.py),
   checked at every check and rewritten where it differs, where the credentials may write; else only logs.

Under a staged rollout (a rollout tag on the version the alias names: protocol/staged_pull.py) the device
runs that version only once the host's wave admits it, and the rollout's `from` version until then or
after a halt (staged.py). Before a download it waits its share of the spread window (`--follow-spread`,
half the interval unless set), so the devices a wave admits do not all download in the same second.

A version that fails (names, size, load, smoke inference) is recorded and not tried again until
the alias names another version. Downloads and state live in `<store>/.follow/<NAME>/`, so a
restart resumes them. This module speaks REST with `requests`; the device never imports MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from arachne_mlflow import reconcile
from arachne_mlflow.errors import (
    ArachneError,
    InvalidInputError,
    ModelNotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from arachne_mlflow.model.names import check_name
from arachne_mlflow.server.metrics import Metrics
from arachne_mlflow.server.pull.capture_upload import CaptureUploader
from arachne_mlflow.server.pull.install import install_version
from arachne_mlflow.server.pull.registry_client import ModelRef, ModelVersion, RegistryClient
from arachne_mlflow.server.pull.report import RunReporter
from arachne_mlflow.server.pull.staged import staged_version, wait_spread
from arachne_mlflow.server.store import ModelStore

_logger = logging.getLogger(__name__)

FOLLOW_DIR = ".follow"  # under the store root; not a model name, so the store leaves it alone
DEFAULT_INTERVAL = 60.0
BACKOFF_FACTOR_CAP = 10  # an unreachable server is retried at most every 10 intervals...
BACKOFF_SECONDS_CAP = 3600.0  # ...and at most every hour
PULL_TIMEOUT = 3600.0  # one try at downloading a version; the next try resumes where it stopped


@dataclass
class FollowConfig:
    """What `serve --follow` asked: served name -> reference, the registry, the poll interval, this device's name."""

    follows: dict[str, ModelRef]
    registry: RegistryClient
    interval: float = DEFAULT_INTERVAL
    device: str = field(default_factory=socket.gethostname)
    spread: float | None = None  # seconds over which downloads are spread (None: half the interval)
    capture: Any = None  # the server's field capture (server/capture/): its spools are delivered (capture_upload.py)


def parse_follows(values: list[str]) -> dict[str, ModelRef]:
    """`NAME=models:/REGISTERED@ALIAS` or `NAME=models:/REGISTERED/3` flags, each NAME once."""
    follows: dict[str, ModelRef] = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep:
            raise InvalidInputError(f"--follow {value[:200]!r}: write NAME=models:/REGISTERED@ALIAS")
        check_name(name)
        if name in follows:
            raise InvalidInputError(f"--follow names {name!r} twice")
        follows[name] = ModelRef.parse(uri)
    return follows


def start_followers(config: FollowConfig, store: ModelStore, metrics: Metrics) -> dict[str, Follower]:
    """One started `Follower` per followed name; the download directories of names no longer followed go."""
    root = store.root / FOLLOW_DIR
    root.mkdir(exist_ok=True)
    for stale in root.iterdir():
        if stale.name not in config.follows:
            shutil.rmtree(stale, ignore_errors=True)
    interval, device = config.interval, config.device
    spread = interval / 2 if config.spread is None else config.spread
    followers = {  # (a registry client each: a requests session is not meant for many threads)
        name: Follower(
            name,
            ref,
            store,
            config.registry.clone(),
            metrics,
            interval=interval,
            device=device,
            spread=spread,
            capture=config.capture,
        )
        for name, ref in config.follows.items()
    }
    for follower in followers.values():
        follower.start()
    return followers


class Follower:
    """Keeps the served model `name` at the version `ref` names, in a thread of its own."""

    def __init__(
        self,
        name: str,
        ref: ModelRef,
        store: ModelStore,
        registry: RegistryClient,
        metrics: Metrics,
        *,
        interval: float = DEFAULT_INTERVAL,
        device: str,
        spread: float = 0.0,
        capture: Any = None,
    ):
        if not interval > 0:
            raise InvalidInputError(f"the follow interval must be positive, not {interval}")
        if not 0 <= spread < float("inf"):
            raise InvalidInputError(f"the follow spread must be 0 or more seconds, not {spread}")
        self.name, self.ref, self.store, self.registry = name, ref, store, registry
        self.metrics, self.interval, self.device = metrics, interval, device
        self.spread = spread
        self.directory = store.root / FOLLOW_DIR / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        registry.stop = self._stop  # a registry request in progress ends when the follower stops
        self.pull_seconds = PULL_TIMEOUT
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._random = random.Random()
        self.schedule = reconcile.Schedule(
            interval, jitter=0.5, backoff_cap=BACKOFF_FACTOR_CAP, max_backoff=BACKOFF_SECONDS_CAP
        )
        self._logged_error = ""
        self._record = RunReporter(name, device, ref.registered_model, registry, self.directory)
        self._capture = CaptureUploader(name, ref.registered_model, store, registry, self.directory, capture)
        saved = self._load_state()
        self._failed_version: str | None = saved.get("failed_version") if saved.get("model_uri") == ref.uri else None
        self._failed_error = str(saved.get("failed_error") or "refused") if self._failed_version else ""
        self._status: dict[str, Any] = {
            "model_uri": ref.uri,
            "registry": registry.tracking_uri,
            "device": device,
            "interval_seconds": interval,
            "state": "starting",
            "latest_version": None,
            "failed_version": self._failed_version,
            "last_check": None,
            "last_success": None,
            "last_error": saved.get("failed_error") if self._failed_version else None,
            "last_error_at": None,
            "next_check": None,
        }

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"arachne-follow-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (a registry request or download in progress ends at once)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        """What the device follows and how that goes, for `GET /v2/repository/models/{m}`."""
        with self._lock:
            status = dict(self._status)
        status["version"] = self._running_version()
        return status

    def _run(self) -> None:
        reconcile.run(
            self._pass, self.schedule, self._stop, on_error=self._unexpected, on_wait=self._waiting, rng=self._random
        )

    def _pass(self) -> reconcile.Outcome:
        """One check; an unreachable tracking server is a transient failure (the loop backs off)."""
        return reconcile.RETRY if self.check() or self._capture.deliver() else reconcile.DONE

    def _unexpected(self, err: Exception, delay: float) -> None:
        """A bug must not end following: logged with its traceback, retried after the back-off."""
        _logger.error("follow %s: unexpected error", self.name, exc_info=err)

    def _waiting(self, delay: float) -> None:
        self._set(next_check=_iso(time.time() + delay))

    def _delay(self, failures: int) -> float:
        """Seconds to the next check: the interval, doubled per failure in a row (capped), times 0.5-1."""
        return self.schedule.delay(failures, self._random)

    # -- one check -------------------------------------------------------------------------
    def check(self) -> bool:
        """Resolve the reference; pull and install a version the device does not run yet.

        Returns True when the tracking server could not be reached (the caller backs off).
        """
        self._set(last_check=_iso())
        try:
            mv = self.registry.resolve(self.ref)
        except RegistryError as err:
            self._failed("check", f"checking {self.ref.uri}: {err}")
            return isinstance(err, RegistryUnavailableError)
        self._set(last_success=_iso(), latest_version=mv.version)
        self.metrics.follow_last_success.labels(self.name).set(time.time())
        running = self._running_version()
        try:
            staged = staged_version(mv, self.ref, self.device, running, self.registry)
        except RegistryError as err:
            self._failed("check", f"checking {self.ref.uri}'s staged rollout: {err}")
            return isinstance(err, RegistryUnavailableError)
        if staged is None:  # a staged rollout has not admitted this device, and names no version to keep
            self._set(state="waiting")
            return False
        mv = staged
        if self._failed_version is not None and mv.version != self._failed_version:
            self._forget_failure()  # the alias moved: a version that failed before may be tried again
        if mv.status != "READY":
            self._failed("check", f"version {mv.version} of {mv.name} is {mv.status or 'not ready'}, not READY")
            return False
        if running == mv.version:
            self._set(state="following")
            record = self.store.record(self.name)
            self._record.report(mv.version, "deployed", revision=record["revision"], variant=record.get("variant"))
            return False
        if mv.version == self._failed_version:
            self._set(state="failed")
            self._record.report(mv.version, "failed", error=self._failed_error)
            return False
        return self._pull(mv, running)

    def _pull(self, mv: ModelVersion, running: str | None) -> bool:
        _logger.info("follow %s: %s is version %s (running %s): pulling", self.name, self.ref.uri, mv.version, running)
        self._set(state="spreading")
        if not wait_spread(self.device, self.spread, self._stop):
            return False
        self._set(state="pulling")
        self._record.report(mv.version, "pulling")
        try:
            record = install_version(
                self.name, self.ref, mv, self.store, self.registry, self.directory, self.pull_seconds, self._stop
            )
        except RegistryUnavailableError as err:
            self._failed("download", f"pulling version {mv.version}: {err} (resumed at the next try)")
            return True
        except RegistryError as err:
            self._failed("download", f"pulling version {mv.version}: {err}")
            return False
        except ArachneError as err:  # the version itself (before OSError: ModelNotFoundError is one)
            self._version_failed(mv, err)
            return False
        except OSError as err:  # a full disk, a store that cannot be written: try again later
            self._failed("download", f"pulling version {mv.version}: {type(err).__name__}: {err}")
            return True
        self.metrics.follow_updates.labels(self.name).inc()
        with contextlib.suppress(ArachneError):  # unloaded again meanwhile: nothing to record
            self.metrics.load_seconds.labels(self.name).set(self.store.get(self.name).load_seconds)
        _logger.info("follow %s: version %s deployed (revision %s)", self.name, mv.version, record["revision"])
        self._set(state="following")
        self._record.report(mv.version, "deployed", revision=record["revision"], variant=record.get("variant"))
        return False

    # -- state -----------------------------------------------------------------------------
    def _running_version(self) -> str | None:
        """The registry version the store serves under `name`, if it came from the followed registered model."""
        try:
            provenance = self.store.record(self.name).get("provenance") or {}
        except ModelNotFoundError:
            return None
        if provenance.get("registered_model") != self.ref.registered_model:
            return None
        return provenance.get("version")

    def _failed(self, stage: str, message: str) -> None:
        """A check or download that failed for a reason outside the version itself: logged once per new message."""
        self.metrics.follow_failures.labels(self.name, stage).inc()
        self._set(state="error", last_error=message, last_error_at=_iso())
        if message != self._logged_error:
            _logger.error("follow %s: %s; the device keeps serving what it has", self.name, message)
            self._logged_error = message

    def _version_failed(self, mv: ModelVersion, err: Exception) -> None:
        message = f"version {mv.version} was not installed: {err}"
        self.metrics.follow_failures.labels(self.name, "version").inc()
        self._failed_version, self._failed_error = mv.version, message
        self._save_state({"model_uri": self.ref.uri, "failed_version": mv.version, "failed_error": message})
        self._set(state="failed", failed_version=mv.version, last_error=message, last_error_at=_iso())
        _logger.error(
            "follow %s: %s; the device keeps serving %s and tries again when %s names another version",
            self.name,
            message,
            self._running_version() or "nothing",
            self.ref.uri,
        )
        shutil.rmtree(self.directory / f"v{mv.version}", ignore_errors=True)
        self._record.report(mv.version, "failed", error=message)

    def _forget_failure(self) -> None:
        self._failed_version = None
        self._save_state({"model_uri": self.ref.uri})
        self._set(failed_version=None)

    def _set(self, **values: Any) -> None:
        with self._lock:
            self._status.update(values)

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.directory / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _save_state(self, state: dict[str, Any]) -> None:
        temporary = self.directory / f".state.{uuid.uuid4().hex[:8]}"
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.directory / "state.json")


def _iso(timestamp: float | None = None) -> str:
    moment = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds")
