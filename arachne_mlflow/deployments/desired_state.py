"""What should run where, kept as tags in the MLflow model registry (so it shows in MLflow's UI).

    registered model tag  arachne.deploy.<deployment>   {"target", "model_uri", "strategy", "status",
                                                         "reason", "updated_at", "version",
                                                         "previous_version", "devices"}
    model version tag     arachne.devices.<deployment>  {"<device>": {"state", "revision", "at", "error"}}
                          (the host's own entries for pushed devices: this command is its one writer)
    run in experiment     arachne-devices               one per pulling device (protocol/device_records.py)
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from arachne_mlflow.deployments.results import PULLING, ROLLED_BACK, DeviceResult
from arachne_mlflow.deployments.source import quote_filter
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import bounded_json, device_records
from arachne_mlflow.protocol.device_state import (  # the record's contract, shared with pulling devices
    DEVICES_PREFIX,
    MAX_ERROR_CHARS,
    SUMMARY_KEY,
    fit_version_tag,
    parse_tag,
)

DEPLOY_PREFIX = "arachne.deploy."
MARKER_KEY = "arachne.deployed"
ROLLED_OUT, ROLLING, HALTED, DELETING = "rolled-out", "rolling", "halted", "deleting"
# registered_model_tags.value is VARCHAR(5000) in MLflow's SQL schema (Postgres and MySQL enforce it);
# model_version_tags.value is TEXT, bounded by MLflow's own check on registry tag values (device_state).
MAX_MODEL_TAG = 5000
_SEARCH_PAGE = 1000
WRITER = "arachne-mlflow"  # the `by` of every desired state this tool writes: `fleet sync` acts on no other
STATES = (ROLLED_OUT, ROLLING, HALTED, DELETING)


@dataclass
class Broken:
    """A `arachne.deploy.*` tag that is not a desired state this tool wrote: reported, never acted on."""

    deployment: str
    registered_model: str
    error: str


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
    variants: list[str] | None = None  # -C variants: the order of a model's variants this deployment prefers

    def tag_value(self) -> str:
        """The tag's JSON, the reason shortened to fit the registry's bound."""
        body = {k: v for k, v in asdict(self).items() if k not in ("deployment", "registered_model")}
        body["by"] = WRITER
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
        """The desired state in a tag's JSON (parsed within bounds), or `InvalidInputError` saying
        what is wrong with it: only what this tool wrote, with the types it writes, is accepted."""
        where = f"registered model {registered_model!r}: tag {DEPLOY_PREFIX}{deployment}"
        try:
            body = bounded_json.loads(value, where, max_bytes=4 * MAX_MODEL_TAG, max_containers=64, max_depth=4)
            if not isinstance(body, dict) or body.get("by") != WRITER:
                raise InvalidInputError(f'{where} was not written by {WRITER} (no "by": "{WRITER}")')
            desired = cls(
                deployment,
                registered_model,
                _text(body, "target"),
                _text(body, "model_uri"),
                status=_text(body, "status", ROLLED_OUT),
                reason=_text(body, "reason", ""),
                version=_version(body.get("version")),
                previous_version=_version(body.get("previous_version")),
                devices={str(k): int(v) for k, v in _mapping(body, "devices").items()},
                strategy=_mapping(body, "strategy") or {"name": "all"},
                updated_at=_text(body, "updated_at", ""),
                variants=_names(body.get("variants")),
            )
        except (InvalidInputError, TypeError, ValueError) as err:
            message = str(err) if str(err).startswith(where) else f"{where}: {err}"
            raise InvalidInputError(f"{message}; not a deployment's desired state: fix or delete the tag") from err
        if desired.status not in STATES:
            raise InvalidInputError(f"{where}: unknown status {desired.status!r}; fix or delete the tag")
        return desired


def _text(body: dict, key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise InvalidInputError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _names(value: Any) -> list[str] | None:
    """A list of variant names, or None (absent: a deployment recorded before variants, or the model's order)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInputError(f"variants must be a list of variant names, got {value!r:.80}")
    return value


def _version(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.isdigit()):
        return value
    raise InvalidInputError(f"a version must be a number as a string, got {value!r}")


def _mapping(body: dict, key: str) -> dict:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{key} must be an object, got {type(value).__name__}")
    return value


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
        """Every deployment recorded in the registry, by name (tags that are not a desired state left out)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[Desired], list[Broken]]:
        """Every deployment recorded in the registry, and every `arachne.deploy.*` tag that is not one
        (each one said apart, so that one bad tag stops no other deployment)."""
        found, broken = [], []
        for model in self._search_models(f"tags.`{MARKER_KEY}` = 'true'"):
            for deployment, value in _deploy_tags(model):
                try:
                    found.append(Desired.from_tag(deployment, model.name, value))
                except InvalidInputError as err:
                    broken.append(Broken(deployment, model.name, str(err)))
        key = lambda d: (d.deployment, d.registered_model)  # noqa: E731
        return sorted(found, key=key), sorted(broken, key=key)

    def recorded(self, desired: Desired) -> dict[str, dict[str, dict[str, Any]]]:
        """What the version tags and the pulling devices' own records say of each device: device -> {version: entry}
        (a device's own record wins over the host's entry for the same version)."""
        by_device: dict[str, dict[str, dict[str, Any]]] = {}
        for version, entries in self._tagged_versions(desired).items():
            for device, entry in entries.items():
                if device != SUMMARY_KEY and isinstance(entry, dict):
                    by_device.setdefault(device, {})[version] = entry
        for device, entry in self.device_records(desired).items():
            by_device.setdefault(device, {})[entry["version"]] = entry
        return by_device

    def device_records(self, desired: Desired) -> dict[str, dict[str, Any]]:
        """The pulling devices' own records of the deployment, read in pages: device -> entry (with its version)."""
        experiment = self.client.get_experiment_by_name(device_records.EXPERIMENT)
        if experiment is None:
            return {}
        found, token = {}, None
        query = device_records.search_filter(desired.deployment)
        while True:
            page = self.client.search_runs(
                [experiment.experiment_id], query, max_results=_SEARCH_PAGE, page_token=token
            )
            for run in page:
                tags = run.data.tags
                entry = device_records.parse_entry(tags)
                if entry is not None and tags.get(device_records.MODEL) == desired.registered_model:
                    found[tags[device_records.DEVICE]] = entry
            token = page.token
            if not token:
                return found

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
                same = same and "last_error" not in old and old.get("variant") == result.variant
                entries[device] = old if same else _deployed(result, stamp)
            elif old.get("state") == "deployed" and result.state != ROLLED_BACK:
                # it had this version before the command failed on it: it keeps it, the failure is noted
                error = (result.error or "")[:MAX_ERROR_CHARS]
                entries[device] = {**old, "last_error": error, "last_error_at": stamp}
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
        """The deployment's desired states; a tag of that name that is not one is left out (`remove_broken`)."""
        key = DEPLOY_PREFIX + deployment
        found = []
        for model in self._search_models(f"tags.`{key}` != ''"):
            try:
                found.append(Desired.from_tag(deployment, model.name, model.tags[key]))
            except InvalidInputError:
                continue
        return found

    def remove_broken(self, deployment: str) -> list[str]:
        """Delete the `arachne.deploy.<deployment>` tags that are not a desired state; the models they were on."""
        key, removed = DEPLOY_PREFIX + deployment, []
        for model in self._search_models(f"tags.`{key}` != ''"):
            try:
                Desired.from_tag(deployment, model.name, model.tags[key])
            except InvalidInputError:
                self.client.delete_registered_model_tag(model.name, key)
                removed.append(model.name)
        return removed

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
        # (a value that is not ours to read counts as empty: rewritten on the next change)
        return {str(version.version): parse_tag(version.tags[key]) for version in versions}

    def _set_version_tag(self, model: str, version: str, key: str, entries: dict[str, Any]) -> None:
        self.client.set_model_version_tag(model, version, key, fit_version_tag(entries))


def _deployed(result: DeviceResult, stamp: str) -> dict[str, Any]:
    """A device's entry once it has the version: its revision, and the variant it runs (a model with variants)."""
    made: dict[str, Any] = {"state": "deployed", "revision": result.revision, "at": stamp}
    if result.variant:
        made["variant"] = result.variant
    return made


def _deploy_tags(model: Any) -> Iterator[tuple[str, str]]:
    for key, value in model.tags.items():
        if key.startswith(DEPLOY_PREFIX):
            yield key[len(DEPLOY_PREFIX) :], value


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
