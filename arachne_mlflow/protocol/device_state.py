"""The device-state record on a model version, as the host's fleet commands write it for the devices they push to
(a pulling device keeps its state on a run of its own: device_records.py).

    model version tag  arachne.devices.<deployment>  {"<device>": {"state", "at", "revision"?, "variant"?, "error"?}}

A version tag holds at most `MAX_VERSION_TAG` characters. When every device's entry does not fit,
the tag is *summarized*: `SUMMARY_KEY` holds `{"devices": N, "<state>": count, ...}` and as many
entries follow as fit (failed devices first); `fleet status` asks the devices for the rest. This
module imports no MLflow: a pulling device's record takes its entry shape and states.
"""

from __future__ import annotations

import json
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import bounded_json

DEVICES_PREFIX = "arachne.devices."
MAX_VERSION_TAG = 100_000  # characters; MLflow's own bound on a registry tag value
MAX_ERROR_CHARS = 300  # of one device's error
SUMMARY_KEY = "_summary"  # no device name starts with "_"
DEPLOYED, FAILED, ROLLED_BACK, PULLING = "deployed", "failed", "rolled-back", "pulling"
STATES = (DEPLOYED, FAILED, ROLLED_BACK, PULLING)


def tag_key(deployment: str) -> str:
    return DEVICES_PREFIX + deployment


def entry(
    state: str, at: str, *, revision: int | None = None, error: str | None = None, variant: str | None = None
) -> dict[str, Any]:
    """One device's entry: its state, when, the store revision it runs, the variant of a model with
    variants it runs, the error that made it fail (bounded)."""
    if state not in STATES:
        raise InvalidInputError(f"device state {state!r} is not one of {', '.join(STATES)}")
    made: dict[str, Any] = {"state": state, "at": at}
    if revision is not None:
        made["revision"] = revision
    if variant:
        made["variant"] = variant
    if error:
        made["error"] = error[:MAX_ERROR_CHARS]
    return made


def parse_tag(value: str | None) -> dict[str, Any]:
    """The tag as a dict (a value that is not a JSON object within the tag's bounds counts as empty)."""
    if not value:
        return {}
    try:
        parsed = bounded_json.loads(value, "the device-state tag", max_bytes=4 * MAX_VERSION_TAG)
    except InvalidInputError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def fit_version_tag(entries: dict[str, Any], limit: int = MAX_VERSION_TAG, first: str | None = None) -> str:
    """The device entries as JSON within `limit` characters: when every device does not fit,
    counts by state and as many entries as fit (`first`, then failed devices, then others)."""
    text = json.dumps(entries, sort_keys=True)
    if len(text) <= limit:
        return text
    return _summarized(_count(entries), entries, limit, first)


def _summarized(counts: dict[str, int], entries: dict[str, Any], limit: int, first: str | None) -> str:
    summary: dict[str, Any] = {SUMMARY_KEY: counts}
    ordered = sorted(entries.items(), key=lambda item: (item[0] != first, _state(item[1]) != FAILED, item[0]))
    size = len(json.dumps(summary))
    for device, listed in ordered:
        grows = len(json.dumps(device)) + len(json.dumps(listed)) + 4  # ', ' before it and ': ' inside
        if size + grows > limit:
            break
        summary[device] = listed
        size += grows
    return json.dumps(summary, sort_keys=True)


def _count(entries: dict[str, Any]) -> dict[str, int]:
    counts = {"devices": len(entries)}
    for listed in entries.values():
        _add(counts, _state(listed), 1)
    return counts


def _add(counts: dict[str, int], state: str, step: int) -> None:
    value = max(counts.get(state, 0) + step, 0)
    if value:
        counts[state] = value
    else:
        counts.pop(state, None)


def _state(listed: Any) -> str:
    state = listed.get("state") if isinstance(listed, dict) else None
    return state if isinstance(state, str) else "unknown"
