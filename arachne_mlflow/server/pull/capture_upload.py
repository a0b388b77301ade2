"""A pulling device delivers the samples it captured: each closed segment of the model's spool goes to the
model's run in the capture experiment (`protocol/capture_runs.py`), then leaves the device.

On the follower's loop, after its check: every closed segment, oldest first, while the pass's budget
lasts, is uploaded through the artifact proxy (paced by the bandwidth cap), confirmed by listing the
run's directory (the file is there with the segment's size), and only then deleted from the spool.
A dropped link or a stopped tracking server leaves the segment in the spool and it goes again at the
next pass; as its run and artifact path follow from its first sample, a second upload overwrites the
first, never adds a copy. Settings come from the environment: `ARACHNE_CAPTURE_MAX_BPS` (bytes a
second, none by default) and `ARACHNE_CAPTURE_BUDGET_SECONDS` (a pass starts no segment after it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from arachne_mlflow.errors import InvalidInputError, RegistryAuthError, RegistryError, RegistryUnavailableError
from arachne_mlflow.protocol import capture_runs
from arachne_mlflow.protocol.capture_format import closed_segments, iter_samples
from arachne_mlflow.server.pull.capture_client import CaptureClient
from arachne_mlflow.server.pull.registry_client import RegistryClient
from arachne_mlflow.server.pull.throttle import PacedReader, TokenBucket

_logger = logging.getLogger(__name__)

SPOOL_DIR = "capture"  # <store>/capture/<model>/: the device's spool of one served model
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
    """Delivers the closed segments of served model `model`'s spool (from `registered_model`) to MLflow."""

    def __init__(
        self,
        model: str,
        registered_model: str,
        store_root: Path,
        registry: RegistryClient,
        settings: UploadSettings | None = None,
    ):
        self.model, self.registered_model = model, registered_model
        self.spool = store_root / SPOOL_DIR / model
        self.client = CaptureClient.like(registry)
        self.settings = settings or UploadSettings.from_env()
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
        """Upload one closed segment, confirm it, delete it (a segment without a whole record goes too)."""
        first = next(iter_samples(segment), None)
        if first is None:
            _logger.warning("capture %s: %s holds no whole record: removed", self.model, segment.name)
            segment.unlink(missing_ok=True)
            return
        run_id, root = self._run(capture_runs.run_key(first, self.registered_model))
        size = segment.stat().st_size
        directory = f"{root}/{capture_runs.artifact_dir(self.model)}"
        with open(segment, "rb") as file:
            bucket = TokenBucket(self.settings.max_bps, self.stop) if self.settings.max_bps else None
            body = PacedReader(file, size, bucket)
            self.client.upload(f"{directory}/{segment.name}", body, size, self._seconds(size))
        listed = self.client.file_sizes(directory).get(segment.name)
        if listed != size:
            raise RegistryUnavailableError(f"the tracking server holds {listed} of its {size} bytes after the upload")
        segment.unlink(missing_ok=True)
        _logger.info("capture %s: %s (%d bytes) delivered to run %s", self.model, segment.name, size, run_id)
        self._warned = ""

    def _seconds(self, size: int) -> float:
        return MIN_UPLOAD_SECONDS + (2 * size / self.settings.max_bps if self.settings.max_bps else 0.0)

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
