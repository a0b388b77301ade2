"""The capture experiment on the host, with MLflow's client: the run that holds a segment, found or made,
and a segment stored there and confirmed (the layout is `protocol/capture_runs.py`'s, as a pulling
device writes it over REST).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arachne_mlflow.errors import RegistryError
from arachne_mlflow.protocol import capture_runs
from arachne_mlflow.protocol.capture_format import Sample


class CaptureRuns:
    """The capture experiment's runs, through one `MlflowClient` (made and remembered on first use)."""

    def __init__(self, client: Any = None):
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient()
        self.client = client
        self._runs: dict[tuple, str] = {}
        self._experiment: str | None = None

    def experiment_id(self, create: bool = True) -> str | None:
        if self._experiment is None:
            experiment = self.client.get_experiment_by_name(capture_runs.EXPERIMENT)
            if experiment is None:
                if not create:
                    return None
                self._experiment = self.client.create_experiment(capture_runs.EXPERIMENT)
            else:
                self._experiment = experiment.experiment_id
        return self._experiment

    def run_for(self, samples: list[Sample], origin: dict[str, tuple[str, str]], registered_model: str = "") -> str:
        """The id of the run that holds a segment of `samples`, found or made, with its revisions' versions
        tagged (`origin`: the device's revision -> registered version, `capture_runs.origins`)."""
        key, revisions = capture_runs.segment_tags(samples, origin, registered_model)
        run_id = self._run(key)
        for tag, value in revisions.items():
            self.client.set_tag(run_id, tag, value)
        return run_id

    def _run(self, key: dict[str, str]) -> str:
        remembered = tuple(sorted(key.items()))
        if remembered not in self._runs:
            experiment = self.experiment_id()
            found = self.client.search_runs([experiment], capture_runs.search_filter(key), max_results=1)
            if found:
                self._runs[remembered] = found[0].info.run_id
            else:
                run = self.client.create_run(experiment, tags=key, run_name=capture_runs.run_name(key))
                self._runs[remembered] = run.info.run_id
        return self._runs[remembered]

    def store(self, run_id: str, model: str, segment: Path) -> None:
        """Store the segment file in the run (a second time overwrites it) and confirm it is there, whole."""
        directory = capture_runs.artifact_dir(model)
        capture_runs.artifact_path(model, segment.name)  # (log_artifact keeps the file's name: checked)
        self.client.log_artifact(run_id, str(segment), directory)
        size = segment.stat().st_size
        listed = {Path(f.path).name: f.file_size for f in self.client.list_artifacts(run_id, directory)}
        if listed.get(segment.name) != size:
            raise RegistryError(f"run {run_id} holds {listed.get(segment.name)} of {segment.name}'s {size} bytes")
