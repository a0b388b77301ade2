"""Pull mode's reporting: this device's state on its own run in the fleet experiment.

The record's shape is `protocol/device_records.py`'s, read by the host's `fleet status`. The device
writes only its own run, so no other device's write can undo it; at every check it reads its
record back (one small answer, whatever the fleet's size) and rewrites it where it differs from
what the device runs, so a record lost or damaged is repaired at the next check. Credentials that
may not write leave the state to the log.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import RegistryAuthError, RegistryError
from arachne_mlflow.protocol import device_records, device_state
from arachne_mlflow.server.pull.registry_client import RegistryClient

_logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"  # in the follower's directory: the id of this device's run


class RunReporter:
    """Writes device `device`'s state for the served model `name` (from `registered_model`) on its run."""

    def __init__(self, name: str, device: str, registered_model: str, registry: RegistryClient, directory: Path):
        self.name, self.device, self.registered_model, self.registry = name, device, registered_model, registry
        self._file = directory / RECORD_FILE
        self._run_id: str | None = _load_run_id(self._file)
        self._read_only = False
        self._warned_missing = False

    def report(
        self,
        version: str,
        state: str,
        revision: int | None = None,
        error: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Make this device's record say `state` for `version` (and the variant it runs, of a model with
        variants): read it, and write it where it differs."""
        if self._read_only:
            return
        entry = device_state.entry(state, _now(), revision=revision, error=error, variant=variant)
        try:
            self._check(version, entry)
        except RegistryAuthError as err:
            self._refused(err)
        except RegistryError as err:
            _logger.warning("follow %s: could not record %r for version %s: %s", self.name, state, version, err)

    def _check(self, version: str, entry: dict[str, Any]) -> None:
        tags = self.registry.run_tags(self._run_id) if self._run_id else None
        if tags is None:  # no run yet, or deleted by hand: found again or made
            self._run_id = self._find_or_create()
            if self._run_id is None:
                return
            tags = {}
        if device_records.same_record(tags, version, entry):
            return
        wanted = {**device_records.identity_tags(self.name, self.device, self.registered_model)}
        wanted.update(device_records.record_tags(version, entry))
        self.registry.set_run_tags(self._run_id, wanted)

    def _find_or_create(self) -> str | None:
        """This device's run, found or made; None while the experiment does not exist. A device with
        credentials never makes the experiment (under MLflow's auth its maker would own it): the admin does."""
        experiment = self.registry.experiment_id(device_records.EXPERIMENT, create=not self.registry.has_credentials)
        if experiment is None:
            if not self._warned_missing:
                _logger.warning(
                    "follow %s: the experiment %s does not exist: its state is only logged until the admin creates "
                    "it and gives this device's user EDIT on it",
                    self.name,
                    device_records.EXPERIMENT,
                )
                self._warned_missing = True
            return None
        search = device_records.search_filter(self.name, self.device)
        run_id = self.registry.find_run(experiment, search)
        if run_id is None:
            identity = device_records.identity_tags(self.name, self.device, self.registered_model)
            run_id = self.registry.create_run(experiment, device_records.run_name(self.name, self.device), identity)
        _save_run_id(self._file, run_id)
        return run_id

    def _refused(self, err: RegistryAuthError) -> None:
        if err.status != 403:
            _logger.warning("follow %s: could not record its state in the registry: %s", self.name, err)
            return
        _logger.info(
            "follow %s: the registry credentials may not write this device's record in experiment %s (403, "
            "read-only): its state is only logged",
            self.name,
            device_records.EXPERIMENT,
        )
        self._read_only = True


def _load_run_id(path: Path) -> str | None:
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id.isalnum() and len(run_id) <= 64 else None


def _save_run_id(path: Path, run_id: str) -> None:
    temporary = path.with_name(f".record.{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps({"run_id": run_id}))
    os.replace(temporary, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
