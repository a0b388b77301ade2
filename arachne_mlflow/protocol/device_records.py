"""Each pulling device's own state record: one MLflow run per (deployment, device) in a fleet experiment.

    experiment  arachne-devices
    run         tags  arachne.deployment, arachne.device, arachne.registered_model,
                      arachne.version, arachne.state (searchable),
                      arachne.entry  {"version", "state", "at", "revision"?, "error"?, ...}

A device writes only its own run (one `runs/log-batch`, no read-modify-write of a value other
devices write), so no device can lose another's state, and `fleet status` reads the records in
pages (`runs/search` filtered by deployment). The entry is a JSON object so that fields can be
added (a reader keeps what it does not know). This module imports no MLflow: devices use it too.
"""

from __future__ import annotations

import json
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import bounded_json, device_state

EXPERIMENT = "arachne-devices"
DEPLOYMENT, DEVICE, MODEL = "arachne.deployment", "arachne.device", "arachne.registered_model"
VERSION, STATE, ENTRY = "arachne.version", "arachne.state", "arachne.entry"
MAX_ENTRY_CHARS = 8000  # one device's entry (MLflow allows run tag values of 8000 characters)
_COMPARED = ("version", "state", "revision", "variant", "error")  # what makes two records different (the time aside)


def run_name(deployment: str, device: str) -> str:
    return f"{deployment}/{device}"


def search_filter(deployment: str, device: str | None = None) -> str:
    """The `runs/search` filter of a deployment's records (of one device's, given `device`)."""
    found = f"tags.`{DEPLOYMENT}` = {_quote(deployment)}"
    return found if device is None else f"{found} AND tags.`{DEVICE}` = {_quote(device)}"


def identity_tags(deployment: str, device: str, registered_model: str) -> dict[str, str]:
    return {DEPLOYMENT: deployment, DEVICE: device, MODEL: registered_model}


def record_tags(version: str, entry: dict[str, Any]) -> dict[str, str]:
    """The tags that say a device's state: `entry` (device_state.entry's shape) for `version`."""
    value = {"version": version, **entry}
    return {VERSION: version, STATE: str(entry.get("state", "")), ENTRY: json.dumps(value, sort_keys=True)}


def parse_entry(tags: dict[str, str]) -> dict[str, Any] | None:
    """The record's entry (with its `version`), or None where the tags hold no entry this can read."""
    value = tags.get(ENTRY)
    if not value or len(value) > MAX_ENTRY_CHARS:
        return None
    try:
        parsed = bounded_json.loads(value, "a device record", max_bytes=4 * MAX_ENTRY_CHARS)
    except InvalidInputError:
        return None
    if (
        not isinstance(parsed, dict)
        or not isinstance(parsed.get("version"), str)
        or parsed.get("state") not in (device_state.STATES)
    ):
        return None
    return parsed


def same_record(tags: dict[str, str], version: str, entry: dict[str, Any]) -> bool:
    """The run's tags say `entry` for `version`, searchable tags included (the time aside): nothing to write."""
    written = parse_entry(tags)
    wanted = {"version": version, **entry}
    return (
        written is not None
        and all(written.get(k) == wanted.get(k) for k in _COMPARED)
        and tags.get(VERSION) == version
        and tags.get(STATE) == entry.get("state")
    )


def _quote(value: str) -> str:
    """A string literal of MLflow's search grammar (single quotes, a quote inside doubled is not
    understood: such names are refused)."""
    if "'" in value or "\\" in value:
        raise InvalidInputError(f"name {value[:200]!r} cannot be searched for: no quotes or backslashes")
    return f"'{value}'"
