"""Where captured samples live in MLflow: one run per (device, served model, registered version, UTC day).

    experiment  arachne-capture
    run         name  <model>/<device>/<day>  (one per registered version too: tagged, not named)
                tags  arachne.capture.device, arachne.capture.model, arachne.registered_model,
                      arachne.version, arachne.capture.day (searchable: the run's key);
                      arachne.capture.revision.<r>: the registered version the device's store
                      revision r served (a sample carries r; a segment may cross an update)
    artifacts   samples/<model>/seg-<12 digits>.cap  (the device's closed segments, unchanged)

The run's key comes from the segment's first sample (its day, its version), never from the time of
the upload, so a retry after a lost confirmation finds the same run and overwrites the same artifact:
a segment is stored once however often it travels. A pulling device (`server/pull/capture_upload.py`,
over REST), the host draining pushed devices (`capture/`, with MLflow's client) and the loader all
use this module, which imports no MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol.capture_format import SEGMENT_PATTERN, Sample, iter_samples

EXPERIMENT = "arachne-capture"
DEVICE, MODEL, DAY = "arachne.capture.device", "arachne.capture.model", "arachne.capture.day"
REGISTERED_MODEL, VERSION = "arachne.registered_model", "arachne.version"
REVISION_TAG = "arachne.capture.revision."  # + a device's store revision: the registered version it served
UNKNOWN = "unknown"  # the version of a revision the device no longer keeps a record of
ARTIFACT_DIR = "samples"


def day_of(timestamp: float) -> str:
    """The UTC day (`YYYY-MM-DD`) of a unix time."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")


def origins(record: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Store revision -> (registered model, version), from a model's store record (`GET
    /v2/repository/models/{m}`): the served version and the kept previous one, where their
    provenance names a registered version. A sample carries its revision; this names its version."""
    found: dict[str, tuple[str, str]] = {}
    for kept in (record or {}, (record or {}).get("previous") or {}):
        provenance = kept.get("provenance") if isinstance(kept, dict) else None
        if not isinstance(provenance, dict) or kept.get("revision") is None:
            continue
        registered, version = provenance.get("registered_model"), provenance.get("version")
        if isinstance(registered, str) and registered and isinstance(version, (str, int)) and str(version):
            found[str(kept["revision"])] = (registered, str(version))
    return found


@dataclass(frozen=True)
class SegmentSummary:
    """What a segment's run is named from, without its tensors: its first sample and the first of each
    other revision in it (`segment_tags` gives them the tags it gives the whole segment), and its count."""

    heads: list[Sample]
    count: int


def summarize_segment(path: Path | str) -> SegmentSummary:
    """A segment's `SegmentSummary`, read one sample at a time, so that delivery never holds a segment's
    samples in memory (a record this reader cannot decode raises, as `iter_samples` does)."""
    heads: dict[str, Sample] = {}
    count = 0
    for sample in iter_samples(path):
        count += 1
        if sample.revision not in heads:
            heads[sample.revision] = replace(sample, inputs={}, outputs={})
    return SegmentSummary(list(heads.values()), count)


def segment_tags(
    samples: Iterable[Sample], origin: dict[str, tuple[str, str]], registered_model: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The identity tags of the run that holds a segment of `samples` (from its first sample), and the
    tags naming the version of each revision in it that `origin` knows (written on that run)."""
    found = list(samples)
    first = found[0]
    registered, version = origin.get(first.revision, (registered_model, UNKNOWN))
    key = {DEVICE: first.device, MODEL: first.model, REGISTERED_MODEL: registered, VERSION: version}
    key[DAY] = day_of(first.timestamp)
    revisions = {REVISION_TAG + first.revision: version}
    for sample in found:
        if sample.revision in origin and origin[sample.revision][0] == registered:
            revisions[REVISION_TAG + sample.revision] = origin[sample.revision][1]
    return key, revisions


def sample_version(sample: Sample, run_tags: dict[str, str]) -> str:
    """The registered version a sample's model was, by the tags of the run that holds it."""
    return run_tags.get(REVISION_TAG + sample.revision, UNKNOWN)


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
