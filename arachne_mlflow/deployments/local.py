"""`mlflow deployments run-local -t arachne-jetson`: a device server in the foreground with the model.

The model is stored and loaded first (so a model that cannot run here fails before the server
starts), then the server serves it and whatever else its store holds until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from arachne_mlflow.deployments.errors import DeploymentError, user_errors
from arachne_mlflow.deployments.source import resolve
from arachne_mlflow.errors import ArachneError
from arachne_mlflow.model.archive import stream_tar
from arachne_mlflow.model.directory import FLAVOR_NAME


@user_errors
def run_local(name: str, model_uri: str, flavor: str | None = None, config: dict[str, Any] | None = None) -> None:
    """Put the model in a model store and serve it (Ctrl-C stops).

    `config` keys are the options of `arachne-mlflow serve` (`host`, `port`, `model_store`,
    `token`, ...); without `model_store`, a temporary store removed at the end.
    """
    from arachne_mlflow.server.main import add_arguments, serve

    if flavor not in (None, FLAVOR_NAME):
        raise DeploymentError(f"run-local serves the {FLAVOR_NAME!r} flavor, not {flavor!r}")
    config = dict(config or {})
    parser = argparse.ArgumentParser(prog="mlflow deployments run-local", add_help=False, exit_on_error=False)
    add_arguments(parser)
    known = set(vars(parser.parse_args([])))
    unknown = sorted(set(config) - known)
    if unknown:
        raise DeploymentError(f"unknown config {unknown}; run-local takes {sorted(known)}")
    try:
        args = parser.parse_args([f"--{key.replace('_', '-')}={value}" for key, value in config.items()])
    except argparse.ArgumentError as err:
        raise DeploymentError(f"bad run-local config: {err}") from err
    with contextlib.ExitStack() as stack:
        if not config.get("model_store"):
            args.model_store = stack.enter_context(tempfile.TemporaryDirectory(prefix="arachne-run-local-"))
        with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
            try:
                _install(name, resolve(model_uri, tmp), Path(args.model_store).expanduser(), Path(tmp, "model.tar"))
            except ArachneError as err:
                raise DeploymentError(f"cannot run {model_uri} locally: {err}") from err
        serve(args)


def _install(name: str, source: Any, store_dir: Path, archive: Path) -> None:
    """Store and load the model the way an upload does (the store takes a tar stream)."""
    from arachne_mlflow.server.store import ModelStore

    with open(archive, "wb") as file:
        file.writelines(stream_tar(source.model.path, source.files))
    store = ModelStore(store_dir)
    try:
        store.open()
        with open(archive, "rb") as file:
            store.put(name, file, source.provenance)
    finally:
        store.close()
