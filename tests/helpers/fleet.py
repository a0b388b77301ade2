"""Fleet tests' helpers: a fleet file of device servers, `mlflow deployments` and `arachne-mlflow fleet`
run in this process (their per-device tables read back), logging to a real `mlflow server`, and
what a device's store on disk says of its uploads."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import yaml


@contextlib.contextmanager
def on_server(url, experiment="arachne-fleet-tests"):
    """Log to the `mlflow server` at `url` in its own experiment, then put the session's state back."""
    import mlflow

    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    previous_experiment = mlflow.tracking.fluent._active_experiment_id
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(experiment)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        mlflow.tracking.fluent._active_experiment_id = previous_experiment
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fleet_file(path, servers, labels=None, extra=None, groups=None):
    """cam-0, cam-1, ... for `servers` (a server or a bare port), cam-0 and cam-1 in site lyon by default."""
    labels = labels or {0: {"site": "lyon"}, 1: {"site": "lyon"}}
    devices = {}
    for i, server in enumerate(servers):
        port = server if isinstance(server, int) else server.port
        devices[f"cam-{i}"] = {"address": f"127.0.0.1:{port}", "labels": labels.get(i, {"site": "paris"})}
    devices.update(extra or {})
    fleet = {"devices": devices, "groups": groups or {"lyon": {"labels": {"site": "lyon"}}, "first": ["cam-0"]}}
    path.write_text(yaml.safe_dump(fleet))
    return path


def deploy(*args, expect=0):
    """`mlflow deployments ...` through its real click command; returns (stdout, stderr)."""
    from click.testing import CliRunner
    from mlflow.deployments.cli import commands

    result = CliRunner().invoke(commands, [str(a) for a in args])
    assert result.exit_code == expect, result.output + (repr(result.exception) if result.exception else "")
    return result.stdout, result.stderr


def table_rows(err):
    """The per-device table rows a command wrote on stderr: device -> [before, after, state, seconds, error...]."""
    return {line.split()[0]: line.split()[1:] for line in err.splitlines() if line.startswith("cam-")}


def fleet_command(capsys, *args):
    """`arachne-mlflow fleet ...` in this process; returns (exit code, stdout, stderr)."""
    from arachne_mlflow import cli

    capsys.readouterr()
    code = cli.main(["fleet", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def upload_times(server, name):
    """When the served version of `name` arrived on `server` and when the server switched to it (ns),
    from its store on disk: the version directory's mtime (its last file written) and CURRENT.json's
    (the record naming it, written at the switch). Exact, and the same clock for every local server."""
    directory = Path(server.store) / name
    record = json.loads((directory / "CURRENT.json").read_text())
    return (directory / record["version_dir"]).stat().st_mtime_ns, (directory / "CURRENT.json").stat().st_mtime_ns


def stored_versions(server, name):
    """The version directories `server` keeps of `name` (served and previous), by name."""
    return sorted(p.name for p in (Path(server.store) / name).iterdir() if p.name.startswith("v-"))
