"""Where captured samples live in MLflow: one run per (device, served model, registered version, UTC day).

    experiment  arachne-capture
    run         name  <model>/<device>/<day>  (one per registered version too: tagged, not named)
                tags  arachne.capture.device, arachne.capture.model, arachne.registered_model,
                      arachne.version, arachne.capture.day (searchable)
    artifacts   samples/<model>/seg-<12 digits>.cap  (the device's closed segments, unchanged)

The run's key comes from the segment's first sample (its day, its version), never from the time of
the upload, so a retry after a lost confirmation finds the same run and overwrites the same artifact:
a segment is stored once however often it travels. A pulling device (`server/pull/capture_upload.py`,
over REST), the host draining pushed devices (`capture/`, with MLflow's client) and the loader all
use this module, which imports no MLflow.
"""

from __future__ import annotations

from datetime import datetime, timezone

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.capture_format import SEGMENT_PATTERN, Sample

EXPERIMENT = "arachne-capture"
DEVICE, MODEL, DAY = "arachne.capture.device", "arachne.capture.model", "arachne.capture.day"
REGISTERED_MODEL, VERSION = "arachne.registered_model", "arachne.version"
ARTIFACT_DIR = "samples"
META_REGISTERED_MODEL, META_VERSION = "registered_model", "version"  # a sample's meta keys, where it has them


def day_of(timestamp: float) -> str:
    """The UTC day (`YYYY-MM-DD`) of a unix time."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")


def version_of(sample: Sample) -> str:
    """The registered version a sample's model ran: its meta's, else its revision."""
    return sample.meta.get(META_VERSION) or sample.revision


def run_key(sample: Sample, registered_model: str) -> dict[str, str]:
    """The identity tags of the run that holds the segment whose first sample is `sample`."""
    return {
        DEVICE: sample.device,
        MODEL: sample.model,
        REGISTERED_MODEL: sample.meta.get(META_REGISTERED_MODEL) or registered_model,
        VERSION: version_of(sample),
        DAY: day_of(sample.timestamp),
    }


def run_name(key: dict[str, str]) -> str:
    return f"{key[MODEL]}/{key[DEVICE]}/{key[DAY]}"


def search_filter(key: dict[str, str]) -> str:
    """The `runs/search` filter matching runs whose tags equal `key`'s (any subset of the identity tags)."""
    return " AND ".join(f"tags.`{tag}` = {_quote(value)}" for tag, value in sorted(key.items()))


def artifact_dir(model: str) -> str:
    return f"{ARTIFACT_DIR}/{model}"


def artifact_path(model: str, segment: str) -> str:
    """Where a segment is stored in its run's artifacts; the name is checked (it becomes a path)."""
    if not SEGMENT_PATTERN.fullmatch(segment):
        raise InvalidInputError(f"{segment[:100]!r} is not a capture segment name (seg-<12 digits>.cap)")
    return f"{artifact_dir(model)}/{segment}"


def _quote(value: str) -> str:
    """A string literal of MLflow's search grammar; names with quotes or backslashes are refused."""
    if "'" in value or "\\" in value:
        raise InvalidInputError(f"{value[:200]!r} cannot be searched for: no quotes or backslashes")
    return f"'{value}'"
