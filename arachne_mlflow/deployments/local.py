"""`mlflow deployments run-local -t arachne-jetson`: a device server in the foreground with the model."""

from __future__ import annotations

import tempfile
from typing import Any

from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments.source import resolve
from arachne_mlflow.errors import ArachneError


def run_local(name: str, model_uri: str, flavor: str | None = None, config: dict[str, Any] | None = None) -> None:
    """Install the model in a model store and serve it until interrupted (Ctrl-C)."""
    from arachne_mlflow.server import serve
    from arachne_mlflow.server.store import ModelStore

    config = dict(config or {})
    store_dir = config.get("model_store") or tempfile.mkdtemp(prefix="arachne-run-local-")
    with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
        try:
            source = resolve(model_uri, tmp)
            ModelStore(store_dir).install(name, source.model.path, files=source.model.files(), info=source.info)
        except ArachneError as err:
            raise MlflowException(f"cannot run {model_uri} locally: {err}") from err
    serve(host=config.get("host", "127.0.0.1"), port=int(config.get("port", 5051)), model_store=store_dir,
          token=config.get("token"))
