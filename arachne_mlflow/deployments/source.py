"""Resolve an MLflow model URI to a local `arachne` model and the provenance recorded on devices."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.model_dir import ArachneModel, read_model_dir


@dataclass
class ModelSource:
    model: ArachneModel
    info: dict[str, Any]


def resolve(model_uri: str, dst_path: str) -> ModelSource:
    """Download `model_uri` (runs:/, models:/name/1, models:/name@alias, models:/m-<id>, a path).

    Raises `InvalidInputError` when the model has no `arachne` flavor, naming the ones it has.
    """
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    model = read_model_dir(local)
    info: dict[str, Any] = {
        "model_uri": model_uri,
        "runtime": model.runtime,
        "run_id": model.mlmodel.get("run_id"),
        "model_id": model.mlmodel.get("model_id"),
        "signature": _signature(model),
        "deployed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model_uri.startswith("models:/"):
        info.update(_registry_provenance(model_uri))
    return ModelSource(model, {k: v for k, v in info.items() if v is not None})


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
    path = model_uri[len("models:/"):]
    if "@" in path and "/" not in path:
        result["alias"] = path.rsplit("@", 1)[1]
    version_info = client.get_model_version(name, str(version))
    if version_info.run_id:
        result["run_id"] = version_info.run_id
    return result


def _signature(model: ArachneModel) -> dict[str, Any] | None:
    signature = model.mlmodel.get("signature")
    if not isinstance(signature, dict):
        return None
    return {k: json.loads(v) for k, v in signature.items() if isinstance(v, str)}
