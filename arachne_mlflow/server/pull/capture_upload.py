"""A pulling device delivers the samples it captured: each closed segment of the model's spool goes to the
model's run in the capture experiment (`protocol/capture_runs.py`), then leaves the device.

On the follower's loop, after its check: every closed segment of `<store>/.capture/<model>/`, oldest
first, while the pass's budget lasts, is uploaded through the artifact proxy (paced by the bandwidth
cap), confirmed by listing the run's directory (the file is there with the segment's size), and only
then deleted from the spool (through the server's `Capture`, which counts it uploaded).
A dropped link or a stopped tracking server leaves the segment in the spool and it goes again at the
next pass; as its run and artifact path follow from its first sample, a second upload overwrites the
first, never adds a copy. Settings come from the environment: `ARACHNE_CAPTURE_MAX_BPS` (bytes a
second, none by default) and `ARACHNE_CAPTURE_BUDGET_SECONDS` (a pass starts no segment after it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import (
    InvalidInputError,
    ModelNotFoundError,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
)
from arachne_mlflow.protocol import capture_runs
from arachne_mlflow.protocol.capture_format import closed_segments
from arachne_mlflow.server.capture.manager import CAPTURE_DIR
from arachne_mlflow.server.pull.capture_client import CaptureClient
from arachne_mlflow.server.pull.registry_client import RegistryClient
from arachne_mlflow.server.pull.throttle import PacedReader, TokenBucket
from arachne_mlflow.server.store import ModelStore

_logger = logging.getLogger(__name__)

IN_FLIGHT_FILE = "capture-in-flight.json"  # in the follower's directory: segment -> the run it is sent to
MAX_BPS_ENV, BUDGET_ENV = "ARACHNE_CAPTURE_MAX_BPS", "ARACHNE_CAPTURE_BUDGET_SECONDS"
DEFAULT_BUDGET_SECONDS = 300.0
MIN_UPLOAD_SECONDS = 60.0  # an upload's deadline: this, plus twice its time at the cap


@dataclass(frozen=True)
class UploadSettings:
    max_bps: float | None = None
    budget_seconds: float = DEFAULT_BUDGET_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> UploadSettings:
        return cls(_positive(environ, MAX_BPS_ENV, None), _positive(environ, BUDGET_ENV, DEFAULT_BUDGET_SECONDS))


class CaptureUploader:
    """Delivers the closed segments of served model `model`'s spool (from `registered_model`) to MLflow.

    `capture` (the server's `Capture`, when it runs one) deletes delivered segments through the spool
    and counts them; `directory` keeps the run each segment in flight was sent to, so a retry after
    a lost confirmation goes to the same run whatever changed meanwhile.
    """

    def __init__(
        self,
        model: str,
        registered_model: str,
        store: ModelStore,
        registry: RegistryClient,
        directory: Path,
        capture: Any = None,
        settings: UploadSettings | None = None,
    ):
        self.model, self.registered_model, self.store, self.capture = model, registered_model, store, capture
        self.spool = store.root / CAPTURE_DIR / model
        self.client = CaptureClient.like(registry)
        self.settings = settings or UploadSettings.from_env()
        self._in_flight = directory / IN_FLIGHT_FILE
        self._runs: dict[tuple, tuple[str, str]] = {}  # run key -> run id, artifact root
        self._warned = ""

    @property
    def stop(self) -> threading.Event | None:
        return self.client.stop

    def deliver(self) -> bool:
        """Upload what the spool holds, within the budget. True when the tracking server was unreachable."""
        started = time.monotonic()
        for segment in closed_segments(self.spool):
            if time.monotonic() - started > self.settings.budget_seconds or (self.stop and self.stop.is_set()):
                return False
            try:
                self.deliver_segment(segment)
            except RegistryUnavailableError as err:
                self._warn(f"{segment.name} stays in the spool: {err}")
                return True
            except RegistryError as err:
                self._warn(f"{segment.name} stays in the spool: {err}")
                return False
            except InvalidInputError as err:  # a record this reader cannot decode: kept for a newer one
                self._warn(f"{segment.name} stays in the spool: {err}")
            except OSError as err:  # gone meanwhile, or a disk that cannot be read: the next pass sees
                self._warn(f"{segment.name}: {type(err).__name__}: {err}")
                return False
        return False

    def deliver_segment(self, segment: Path) -> None:
        """Upload one closed segment, confirm it, delete it (a segment without a whole record goes too).
        Its bytes stream from the file to the socket: neither the segment nor its samples are held in memory."""
        summary = capture_runs.summarize_segment(segment)
        if not summary.count:
            _logger.warning("capture %s: %s holds no whole record: removed", self.model, segment.name)
            self._delete(segment)
            return
        run_id, root = self._run_of(segment.name, summary.heads)
        size = segment.stat().st_size
        directory = f"{root}/{capture_runs.artifact_dir(self.model)}"
        with open(segment, "rb") as file:
            bucket = TokenBucket(self.settings.max_bps, self.stop) if self.settings.max_bps else None
            body = PacedReader(file, size, bucket)
            self.client.upload(f"{directory}/{segment.name}", body, size, self._seconds(size))
        listed = self.client.file_sizes(directory).get(segment.name)
        if listed != size:
            raise RegistryUnavailableError(f"the tracking server holds {listed} of its {size} bytes after the upload")
        self._delete(segment)
        self._remember(segment.name, None)
        if self.capture is not None:
            self.capture.uploaded(self.model, summary.count)
        _logger.info("capture %s: %s (%d samples) delivered to run %s", self.model, segment.name, summary.count, run_id)
        self._warned = ""

    def _seconds(self, size: int) -> float:
        return MIN_UPLOAD_SECONDS + (2 * size / self.settings.max_bps if self.settings.max_bps else 0.0)

    def _run_of(self, segment: str, samples: list) -> tuple[str, str]:
        """The run (id, artifact root) a segment goes to: the one it went to before, else its key's
        (`samples`: the segment's, or its summary's heads)."""
        sent = self._load_in_flight().get(segment)
        if sent is not None:
            return sent, self.client.artifact_root(sent)
        key, revisions = capture_runs.segment_tags(samples, capture_runs.origins(self._record()), self.registered_model)
        run_id, root = self._run(key)
        self.client.set_run_tags(run_id, revisions)
        self._remember(segment, run_id)
        return run_id, root

    def _run(self, key: dict[str, str]) -> tuple[str, str]:
        """The run (id, artifact root) of `key`: remembered, found, or made."""
        remembered = tuple(sorted(key.items()))
        if remembered not in self._runs:
            experiment = self.client.experiment_id(capture_runs.EXPERIMENT, create=not self.client.has_credentials)
            if experiment is None:
                raise RegistryAuthError(
                    f"the experiment {capture_runs.EXPERIMENT} does not exist: the admin creates it and gives this "
                    "device's user EDIT on it",
                    403,
                )
            run_id = self.client.find_run(experiment, capture_runs.search_filter(key))
            if run_id is None:
                run_id = self.client.create_run(experiment, capture_runs.run_name(key), key)
            self._runs[remembered] = (run_id, self.client.artifact_root(run_id))
        return self._runs[remembered]

    def _record(self) -> dict[str, Any] | None:
        try:
            return self.store.record(self.model)
        except ModelNotFoundError:
            return None

    def _delete(self, segment: Path) -> None:
        if self.capture is None:
            segment.unlink(missing_ok=True)
            return
        with contextlib.suppress(ModelNotFoundError):  # (gone already)
            self.capture.delete_segment(self.model, segment.name)

    def _load_in_flight(self) -> dict[str, str]:
        try:
            found = json.loads(self._in_flight.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(found, dict):
            return {}
        return {k: v for k, v in found.items() if isinstance(v, str) and v.isalnum() and len(v) <= 64}

    def _remember(self, segment: str, run_id: str | None) -> None:
        """Write (or, with None, forget) the run a segment is being sent to, atomically."""
        found = self._load_in_flight()
        if run_id is None and segment not in found:
            return
        if run_id is None:
            del found[segment]
        else:
            found[segment] = run_id
        temporary = self._in_flight.with_name(f".{IN_FLIGHT_FILE}.{uuid.uuid4().hex[:8]}")
        temporary.write_text(json.dumps(found))
        os.replace(temporary, self._in_flight)

    def _warn(self, message: str) -> None:
        if message != self._warned:  # (once per new message: an offline server fails every pass)
            _logger.warning("capture %s: %s", self.model, message)
            self._warned = message


def _positive(environ: Mapping[str, str], name: str, default: float | None) -> float | None:
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise InvalidInputError(f"{name}={value[:40]!r}: give a positive number")
    return number
