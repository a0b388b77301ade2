"""What should run where, kept as tags in the MLflow model registry (so it shows in MLflow's UI).

    registered model tag  arachne.deploy.<deployment>   {"target", "model_uri", "strategy", "status",
                                                         "reason", "updated_at", "version",
                                                         "previous_version", "devices"}
    model version tag     arachne.devices.<deployment>  {"<device>": {"state", "revision", "at", "error"}}
    registered model tag  arachne.deployed = "true"     on every model with a deployment

The model URI is kept as the user gave it (an alias stays an alias, so `fleet sync` rolls out an
alias move); `version` is the version last rolled out (or tried: a halted rollout), and
`previous_version` the one the deployment ran before it (what `fleet rollback` goes back to). A
device is listed on the version it runs, or on the version it failed to get (`failed`) or that a
halted rollout took back from it (`rolled-back`). MLflow's tag filters match exact keys only, hence the
fixed `arachne.deployed` marker that `fleet status` searches for. Only MLflow's public client
API is used, so any tracking server (and its permissions) works.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from arachne_mlflow.deployments.converge import PULLING, ROLLED_BACK, DeviceResult
from arachne_mlflow.deployments.source import quote_filter
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.device_state import (  # the record's contract, shared with pulling devices
    DEVICES_PREFIX,
    MAX_ERROR_CHARS,
    SUMMARY_KEY,
    fit_version_tag,
)

DEPLOY_PREFIX = "arachne.deploy."
MARKER_KEY = "arachne.deployed"
ROLLED_OUT, ROLLING, HALTED, DELETING = "rolled-out", "rolling", "halted", "deleting"
# registered_model_tags.value is VARCHAR(5000) in MLflow's SQL schema (Postgres and MySQL enforce it);
# model_version_tags.value is TEXT, bounded by MLflow's own check on registry tag values (device_state).
MAX_MODEL_TAG = 5000
_SEARCH_PAGE = 1000


@dataclass
class Desired:
    """One deployment's desired state: which model URI should run on which target, and how it went."""

    deployment: str
    registered_model: str
    target: str
    model_uri: str
    status: str = ROLLED_OUT
    reason: str = ""
    version: str | None = None
    previous_version: str | None = None
    devices: dict[str, int] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "all"})
    updated_at: str = ""

    def tag_value(self) -> str:
        """The tag's JSON, the reason shortened to fit the registry's bound."""
        body = {k: v for k, v in asdict(self).items() if k not in ("deployment", "registered_model")}
        if not body["updated_at"]:
            body["updated_at"] = now()
        text = json.dumps(body)
        excess = len(text) - MAX_MODEL_TAG
        if excess > 0 and len(self.reason) > excess + 3:
            body["reason"] = self.reason[: len(self.reason) - excess - 3] + "..."
            text = json.dumps(body)
        if len(text) > MAX_MODEL_TAG:
            raise InvalidInputError(
                f"deployment {self.deployment!r}: its target ({len(self.target)} characters) is too long to keep "
                f"in the registry (a tag holds {MAX_MODEL_TAG}); name the devices in a fleet file and target a group"
            )
        return text

    def same_as(self, other: Desired | None) -> bool:
        """Equal but for the time stamp (nothing to write)."""
        return other is not None and {**asdict(self), "updated_at": ""} == {**asdict(other), "updated_at": ""}

    @classmethod
    def from_tag(cls, deployment: str, registered_model: str, value: str) -> Desired:
        try:
            body = json.loads(value)
            return cls(
                deployment,
                registered_model,
                str(body["target"]),
                str(body["model_uri"]),
                status=str(body.get("status", ROLLED_OUT)),
                reason=str(body.get("reason", "")),
                version=body.get("version"),
                previous_version=body.get("previous_version"),
                devices=dict(body.get("devices") or {}),
                strategy=dict(body.get("strategy") or {"name": "all"}),
                updated_at=str(body.get("updated_at", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InvalidInputError(
                f"registered model {registered_model!r}: tag {DEPLOY_PREFIX}{deployment} is not a deployment's "
                f"desired state ({err}); fix or delete the tag"
            ) from err


class DesiredState:
    """The registry's side of the fleet, read and written through `MlflowClient`."""

    def __init__(self, client: Any = None):
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient()
        self.client = client

    # -- reading ---------------------------------------------------------------------------
    def find(self, deployment: str) -> Desired | None:
        """The desired state of `deployment`, the newest where several models carry it."""
        found = self._find_all(deployment)
        return max(found, key=lambda d: d.updated_at) if found else None

    def all(self) -> list[Desired]:
        """Every deployment recorded in the registry, by name."""
        found = []
        for model in self._search_models(f"tags.`{MARKER_KEY}` = 'true'"):
            for key, value in model.tags.items():
                if key.startswith(DEPLOY_PREFIX):
                    found.append(Desired.from_tag(key[len(DEPLOY_PREFIX) :], model.name, value))
        return sorted(found, key=lambda d: (d.deployment, d.registered_model))

    def recorded(self, desired: Desired) -> dict[str, dict[str, dict[str, Any]]]:
        """What the version tags say of each device: device -> {version: entry}."""
        by_device: dict[str, dict[str, dict[str, Any]]] = {}
        for version, entries in self._tagged_versions(desired).items():
            for device, entry in entries.items():
                if device != SUMMARY_KEY and isinstance(entry, dict):
                    by_device.setdefault(device, {})[version] = entry
        return by_device

    # -- writing ---------------------------------------------------------------------------
    def save(self, desired: Desired) -> None:
        """Record `desired` on its registered model (nothing is written when nothing changed) and
        remove the same deployment from any other registered model it was on."""
        current = None
        for other in self._find_all(desired.deployment):
            if other.registered_model == desired.registered_model:
                current = other
            else:
                self.remove(other)
        if desired.same_as(current):
            return
        desired.updated_at = now()
        self.client.set_registered_model_tag(
            desired.registered_model, DEPLOY_PREFIX + desired.deployment, desired.tag_value()
        )
        if current is None:
            self.client.set_registered_model_tag(desired.registered_model, MARKER_KEY, "true")

    def record_devices(self, desired: Desired, version: str, results: list[DeviceResult]) -> None:
        """Each device's state on the version tags: a device that has `version` moves to its tag
        (off the others'); one that failed to get it, or that a halted rollout rolled back, is
        listed there as failed or rolled-back."""
        key = DEVICES_PREFIX + desired.deployment
        tagged = self._tagged_versions(desired)
        current = tagged.get(version, {})
        current = {} if SUMMARY_KEY in current else current  # a summary cannot be merged: rebuilt below
        entries = dict(current)
        arrived = set()
        stamp = now()
        for result in results:
            device, old = str(result.device), current.get(str(result.device)) or {}
            if result.state == PULLING:  # such a device writes its own entry when it has the version
                continue
            if result.ok:
                arrived.add(device)
                same = old.get("state") == "deployed" and old.get("revision") == result.revision
                entries[device] = old if same else {"state": "deployed", "revision": result.revision, "at": stamp}
            else:
                state = ROLLED_BACK if result.state == ROLLED_BACK else "failed"
                error = (result.error or "")[:MAX_ERROR_CHARS]
                same = old.get("state") == state and old.get("error") == error
                entries[device] = old if same else {"state": state, "at": stamp, "error": error}
        if entries != current:
            self._set_version_tag(desired.registered_model, version, key, entries)
        self._drop(desired, tagged, arrived, keep=version)

    def forget_devices(self, desired: Desired, devices: list[str]) -> None:
        """Take `devices` off every version tag of the deployment (they no longer have it)."""
        if devices:
            self._drop(desired, self._tagged_versions(desired), set(devices))

    def remove(self, desired: Desired) -> None:
        """Forget `desired`: its tag, its device tags, and the marker when it was the model's last."""
        for version in self._tagged_versions(desired):
            self.client.delete_model_version_tag(desired.registered_model, version, DEVICES_PREFIX + desired.deployment)
        self.client.delete_registered_model_tag(desired.registered_model, DEPLOY_PREFIX + desired.deployment)
        tags = self.client.get_registered_model(desired.registered_model).tags
        if not any(key.startswith(DEPLOY_PREFIX) for key in tags):
            self.client.delete_registered_model_tag(desired.registered_model, MARKER_KEY)

    # -- plumbing --------------------------------------------------------------------------
    def _find_all(self, deployment: str) -> list[Desired]:
        key = DEPLOY_PREFIX + deployment
        return [
            Desired.from_tag(deployment, model.name, model.tags[key])
            for model in self._search_models(f"tags.`{key}` != ''")
        ]

    def _drop(self, desired: Desired, tagged: dict, devices: set[str], keep: str | None = None) -> None:
        key = DEVICES_PREFIX + desired.deployment
        for version, entries in tagged.items():
            kept = {d: e for d, e in entries.items() if d not in devices}
            if version == keep or kept == entries:
                continue
            if kept and set(kept) != {SUMMARY_KEY}:
                self._set_version_tag(desired.registered_model, version, key, kept)
            else:
                self.client.delete_model_version_tag(desired.registered_model, version, key)

    def _search_models(self, filter_string: str) -> list[Any]:
        found, token = [], None
        while True:
            page = self.client.search_registered_models(filter_string, max_results=_SEARCH_PAGE, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    def _tagged_versions(self, desired: Desired) -> dict[str, dict[str, Any]]:
        """version -> device entries, for every version of the model carrying the deployment's tag."""
        key = DEVICES_PREFIX + desired.deployment
        versions = self.client.search_model_versions(
            f"name = {quote_filter(desired.registered_model)} AND tags.`{key}` != ''"
        )
        tagged = {}
        for version in versions:
            try:
                entries = json.loads(version.tags[key])
            except ValueError:
                entries = {}  # not ours to read: rewritten on the next change
            tagged[str(version.version)] = entries if isinstance(entries, dict) else {}
        return tagged

    def _set_version_tag(self, model: str, version: str, key: str, entries: dict[str, Any]) -> None:
        self.client.set_model_version_tag(model, version, key, fit_version_tag(entries))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
