"""Resolve an MLflow model URI to a local `arachne` model and the provenance a device records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arachne_mlflow.model.archive import tar_size
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.directory import ArachneModel, read_model_dir


@dataclass
class ModelSource:
    """A downloaded model, the files a push sends, their digest and the provenance stored with them."""

    model: ArachneModel
    files: list[str]
    digest: str
    size: int
    provenance: dict[str, Any]


def resolve(model_uri: str, dst_path: str) -> ModelSource:
    """Download `model_uri` (runs:/, models:/name/1, models:/name@alias, models:/m-<id>, a path).

    Raises `InvalidInputError` when the model has no `arachne` flavor, naming the ones it has.
    Only the files MLmodel names are pushed: a registry download holds others
    (`registered_model_meta`) that are not part of the model.
    """
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    model = read_model_dir(local)
    files = sorted(set(model.files()))
    provenance: dict[str, Any] = {
        "model_uri": model_uri,
        "run_id": model.mlmodel.get("run_id"),
        "model_id": model.mlmodel.get("model_id"),
    }
    if model_uri.startswith("models:/"):
        provenance.update(_registry_provenance(model_uri))
    return ModelSource(
        model,
        files,
        files_digest(model.path, files),
        tar_size(model.path, files),
        {k: v for k, v in provenance.items() if v is not None},
    )


def _registry_provenance(model_uri: str) -> dict[str, Any]:
    """Registered model name, version and alias of a `models:/` URI (nothing for `models:/m-<id>`)."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    resolved = get_model_name_and_version(client, model_uri)
    if len(resolved) != 2:
        return {}
    name, version = resolved
    result: dict[str, Any] = {"registered_model": name, "version": str(version)}
    path = model_uri[len("models:/") :]
    if "@" in path and "/" not in path:
        result["alias"] = path.rsplit("@", 1)[1]
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id:
        result["run_id"] = run_id
    return result
