"""Pull mode's reporting: this device's state on the version's tag `arachne.devices.<NAME>`.

The tag's shape and the merge of one device's entry are `protocol/device_state.py`'s, shared with
the push side (deployments/desired_state.py). Other devices write the same tag, so each write is
read back; credentials that may not write leave the state to the log.
"""

from __future__ import annotations

import logging
import random
import threading
from datetime import datetime, timezone
from typing import Any

from arachne_mlflow.errors import RegistryAuthError, RegistryError
from arachne_mlflow.protocol import device_state
from arachne_mlflow.server.pull.registry_client import ModelVersion, RegistryClient

_logger = logging.getLogger(__name__)

REPORT_ATTEMPTS = 3


class TagReporter:
    """Writes device `device`'s state for the served model `name` (from `registered_model`) on version tags."""

    def __init__(self, name: str, device: str, registered_model: str, registry: RegistryClient, stop: threading.Event):
        self.name, self.device, self.registered_model, self.registry = name, device, registered_model, registry
        self._stop = stop
        self._random = random.Random()
        self._last_report: tuple | None = None
        self._warned_read_only = False

    def report(
        self,
        mv: ModelVersion,
        state: str,
        revision: int | None = None,
        error: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Merge this device's `state` into the version's `arachne.devices.<name>` tag (read-modify-write).

        Other devices write the same tag, so the write is read back and tried again when another
        one replaced it meanwhile. Credentials that may not write (403) leave the state to the log.
        """
        entry = device_state.entry(state, _now(), revision=revision, error=error, variant=variant)
        if self._last_report == (mv.version, state, revision, entry.get("error"), variant):
            return  # tried already (written, or refused as read-only)
        key = device_state.tag_key(self.name)
        listed = device_state.parse_tag(mv.tags.get(key)).get(self.device)  # (tags as of the check)
        if not device_state.same_entry(listed, entry):
            try:
                self._write_entry(mv, key, entry)
            except RegistryAuthError as err:
                self._read_only(err)
            except RegistryError as err:
                _logger.warning("follow %s: could not record %r on version %s: %s", self.name, state, mv.version, err)
                return  # tried again at the next check
        self._last_report = (mv.version, state, revision, entry.get("error"), variant)

    def _write_entry(self, mv: ModelVersion, key: str, entry: dict[str, Any]) -> None:
        """Read the tag, merge `entry` in, write it, read it back; again if another device's write replaced ours."""
        for attempt in range(REPORT_ATTEMPTS):
            if attempt:
                self._stop.wait(self._random.uniform(0.1, 1.0))
            current = self.registry.get_version(mv.name, mv.version).tags.get(key)
            self.registry.set_version_tag(
                mv.name, mv.version, key, device_state.merge_entry(current, self.device, entry)
            )
            written = device_state.parse_tag(self.registry.get_version(mv.name, mv.version).tags.get(key))
            if device_state.same_entry(written.get(self.device), entry):
                return
        _logger.warning("follow %s: other devices kept rewriting %s; state not recorded", self.name, key)

    def unreport(self, version: str) -> None:
        """Take this device off the tag of the version it ran before (it runs another now)."""
        key, model = device_state.tag_key(self.name), self.registered_model
        try:
            current = self.registry.get_version(model, version).tags.get(key)
            if self.device not in device_state.parse_tag(current):
                return
            value = device_state.drop_entry(current, self.device)
            if value is not None:
                self.registry.set_version_tag(model, version, key, value)
            else:
                self.registry.delete_version_tag(model, version, key)
        except RegistryAuthError as err:
            self._read_only(err)
        except RegistryError as err:
            _logger.warning("follow %s: could not update tag %s on version %s: %s", self.name, key, version, err)

    def _read_only(self, err: RegistryAuthError) -> None:
        if err.status != 403:
            _logger.warning("follow %s: could not record its state in the registry: %s", self.name, err)
        elif not self._warned_read_only:
            _logger.info(
                "follow %s: the registry credentials may not write tags (403, read-only): this device's state is "
                "only logged",
                self.name,
            )
            self._warned_read_only = True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
