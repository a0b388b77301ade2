"""`load_samples`: the samples devices captured for a model version, from the capture experiment, as numpy
arrays or a pandas DataFrame (one row per sample, one column per input: ready for
`mlflow.models.evaluate` or for retraining).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow.capture.runs import CaptureRuns
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import capture_runs
from arachne_mlflow.protocol.capture_format import Sample, iter_samples, segments

FORMS = ("numpy", "pandas", "samples")
MAX_RUNS = 100_000  # runs looked at for one call (pages of 1000)
OUTPUT_PREFIX = "output."  # the pandas form's output columns: output.<name>


@dataclass
class CapturedArrays:
    """The numpy form: each input's and output's samples joined along the first axis (one block per
    sample, in time order), and each sample's time, device and version (one entry per sample)."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timestamps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    devices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    versions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __len__(self) -> int:
        return len(self.timestamps)


def load_samples(
    model: str,
    version: str | int | None = None,
    *,
    devices: Iterable[str] | None = None,
    since: float | datetime | None = None,
    until: float | datetime | None = None,
    as_: str = "numpy",
    client: Any = None,
) -> Any:
    """The captured samples of `model` (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a registered
    model's name with `version`; no version: every version), from `devices` (default all), taken at
    `since` <= time < `until` (unix seconds or aware datetimes), oldest first, `as_` numpy
    (`CapturedArrays`), pandas (a DataFrame) or samples (a list of `Sample`)."""
    if as_ not in FORMS:
        raise InvalidInputError(f"as_={as_!r}: choose one of {', '.join(FORMS)}")
    runs = CaptureRuns(client)
    name, version = _model_version(runs.client, model, version)
    start, end = _seconds(since), _seconds(until)
    wanted = None if devices is None else set(devices)
    found = sorted(_samples(runs, name, version, wanted, start, end), key=lambda s: (s[0].timestamp, s[0].device))
    if as_ == "samples":
        return [sample for sample, _ in found]
    return to_dataframe(found) if as_ == "pandas" else to_arrays(found)


def to_arrays(found: list[tuple[Sample, str]]) -> CapturedArrays:
    """The numpy form of (sample, registered version) pairs."""
    samples = [sample for sample, _ in found]
    return CapturedArrays(
        inputs=_joined(samples, "inputs"),
        outputs=_joined(samples, "outputs"),
        timestamps=np.array([s.timestamp for s in samples], dtype=np.float64),
        devices=np.array([s.device for s in samples], dtype=object),
        versions=np.array([version for _, version in found], dtype=object),
    )


def to_dataframe(found: list[tuple[Sample, str]]) -> Any:
    """One row per sample: a column per input (the sample's array, its leading axis of 1 dropped),
    `output.<name>` per output, then `timestamp` (UTC), `device`, `version`."""
    import pandas as pd

    samples = [sample for sample, _ in found]
    columns: dict[str, list[Any]] = {}
    for row, sample in enumerate(samples):
        for prefix, tensors in (("", sample.inputs), (OUTPUT_PREFIX, sample.outputs)):
            for tensor, array in tensors.items():
                columns.setdefault(prefix + tensor, [None] * len(samples))[row] = _cell(array)
    frame = pd.DataFrame(columns, index=pd.RangeIndex(len(samples)))
    frame["timestamp"] = pd.to_datetime([s.timestamp for s in samples], unit="s", utc=True)
    frame["device"] = [s.device for s in samples]
    frame["version"] = [version for _, version in found]
    return frame


def _samples(
    runs: CaptureRuns, name: str, version: str | None, devices: set[str] | None, start: float | None, end: float | None
) -> Iterator[tuple[Sample, str]]:
    """(sample, its registered version) of every segment of the model's runs that the filters keep."""
    for run in _runs(runs, name):
        tags = run.data.tags
        if devices is not None and tags.get(capture_runs.DEVICE) not in devices:
            continue
        if not _day_overlaps(tags.get(capture_runs.DAY, ""), end):
            continue
        model = tags.get(capture_runs.MODEL, "")
        with tempfile.TemporaryDirectory(prefix="arachne-capture-") as temporary:
            local = runs.client.download_artifacts(run.info.run_id, capture_runs.artifact_dir(model), temporary)
            for segment in segments(Path(local)):
                for sample in iter_samples(segment):
                    found = capture_runs.sample_version(sample, tags)
                    if (version is None or found == version) and _wanted(sample, devices, start, end):
                        yield sample, found


def _wanted(sample: Sample, devices: set[str] | None, start: float | None, end: float | None) -> bool:
    return (
        (devices is None or sample.device in devices)
        and (start is None or sample.timestamp >= start)
        and (end is None or sample.timestamp < end)
    )


def _runs(runs: CaptureRuns, name: str) -> Iterator[Any]:
    """The registered model's capture runs, every version (a segment's run is its first sample's version:
    a later sample of the segment may be of another; each sample's version is read from the run's tags)."""
    experiment = runs.experiment_id(create=False)
    if experiment is None:
        return
    key = {capture_runs.REGISTERED_MODEL: name}
    search, token, seen = capture_runs.search_filter(key), None, 0
    while seen < MAX_RUNS:
        page = runs.client.search_runs([experiment], search, max_results=1000, page_token=token)
        yield from page
        seen += len(page)
        token = page.token
        if not token:
            return


def _model_version(client: Any, model: str, version: str | int | None) -> tuple[str, str | None]:
    if not model.startswith("models:/"):
        return model, None if version is None else str(version)
    if version is not None:
        raise InvalidInputError(f"{model}: a models:/ URI names its version already; leave out version=")
    path = model[len("models:/") :]
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return name, client.get_model_version_by_alias(name, alias).version
    name, _, number = path.partition("/")
    if not name or not number.isdigit():
        raise InvalidInputError(f"{model!r}: write models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, str(int(number))


def _seconds(moment: float | datetime | None) -> float | None:
    if moment is None or isinstance(moment, (int, float)):
        return moment
    if moment.tzinfo is None:
        raise InvalidInputError(f"{moment!r}: give an aware datetime (with its time zone) or unix seconds")
    return moment.timestamp()


def _day_overlaps(day: str, end: float | None) -> bool:
    """A run's UTC day may hold samples before `end`: its segments start that day (and may run past it)."""
    return end is None or not day or day <= capture_runs.day_of(end)


def _joined(samples: list[Sample], which: str) -> dict[str, np.ndarray]:
    names = dict.fromkeys(name for sample in samples for name in getattr(sample, which))
    joined = {}
    for name in names:
        arrays = [getattr(sample, which)[name] for sample in samples if name in getattr(sample, which)]
        try:
            joined[name] = np.concatenate([np.atleast_1d(a) for a in arrays], axis=0)
        except ValueError:  # shapes that do not line up: one array per sample
            joined[name] = np.array(arrays + [None], dtype=object)[:-1]
    return joined


def _cell(array: np.ndarray) -> Any:
    return array[0] if array.ndim >= 1 and array.shape[0] == 1 else array
