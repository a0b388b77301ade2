"""`mlflow deployments run-local -t arachne-jetson`: a device server in the foreground with the model.

The model is stored and loaded first (so a model that cannot run here fails before the server
starts), then the server serves it and whatever else its store holds until interrupted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from arachne_mlflow.archive import stream_tar
from arachne_mlflow.deployments.source import resolve
from arachne_mlflow.errors import ArachneError
from arachne_mlflow.model_dir import FLAVOR_NAME


def run_local(name: str, model_uri: str, flavor: str | None = None, config: dict[str, Any] | None = None) -> None:
    """Put the model in a model store and serve it (Ctrl-C stops).

    `config` keys are the options of `arachne-mlflow serve` (`host`, `port`, `model_store`,
    `token`, ...); without `model_store` a new temporary store is used.
    """
    from arachne_mlflow.server.main import add_arguments, serve
    from arachne_mlflow.server.store import ModelStore

    if flavor not in (None, FLAVOR_NAME):
        raise MlflowException(f"run-local serves the {FLAVOR_NAME!r} flavor, not {flavor!r}")
    parser = argparse.ArgumentParser(prog="mlflow deployments run-local", add_help=False, exit_on_error=False)
    add_arguments(parser)
    known = set(vars(parser.parse_args([])))
    unknown = sorted(set(config or {}) - known)
    if unknown:
        raise MlflowException(f"unknown config {unknown}; run-local takes {sorted(known)}")
    try:
        args = parser.parse_args([f"--{key.replace('_', '-')}={value}" for key, value in (config or {}).items()])
    except argparse.ArgumentError as err:
        raise MlflowException(f"bad run-local config: {err}") from err
    if not (config or {}).get("model_store"):
        args.model_store = tempfile.mkdtemp(prefix="arachne-run-local-")
    with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
        try:
            source = resolve(model_uri, tmp)
            archive = Path(tmp, "model.tar")
            with open(archive, "wb") as file:
                file.writelines(stream_tar(source.model.path, source.files))
            store = ModelStore(Path(args.model_store).expanduser())
            try:
                store.open()
                with open(archive, "rb") as file:
                    store.put(name, file, source.info)
            finally:
                store.close()
        except ArachneError as err:
            raise MlflowException(f"cannot run {model_uri} locally: {err}") from err
    serve(args)
