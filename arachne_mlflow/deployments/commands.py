"""`arachne-mlflow fleet status` and `fleet sync`: the command-line side of status.py and fleet.py.

The registry is MLflow's (`MLFLOW_TRACKING_URI`); connection settings come from the
environment (`ARACHNE_TOKEN`, `ARACHNE_TLS`, ...) and the fleet file, as for the plugin's
`list`, `get` and `predict`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from arachne_mlflow.deployments import status as fleet_status
from arachne_mlflow.deployments.desired_state import DesiredState
from arachne_mlflow.deployments.fleet import sync
from arachne_mlflow.deployments.targets import settings
from arachne_mlflow.errors import ArachneError

_logger = logging.getLogger(__name__)


def run_fleet_command(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    config = {"fleet": args.fleet, "parallel": args.parallel}
    options = settings({k: v for k, v in config.items() if v is not None})
    try:
        return _run(args, options, DesiredState())
    except MlflowException as err:
        raise ArachneError(f"the MLflow registry ({_tracking_uri()}) answered: {err}") from err


def _run(args: argparse.Namespace, options, state: DesiredState) -> int:
    if args.fleet_command == "status":
        found = fleet_status.status(args.names, options, state)
        sys.stdout.write(fleet_status.to_json(found) + "\n" if args.json else fleet_status.to_text(found))
        return 0 if all(s.error is None for s in found) else 1
    if args.watch is None:
        return 0 if all(outcome.ok for outcome in sync(args.names, options, state)) else 1
    return _watch(args, options, state)


def _watch(args: argparse.Namespace, options, state: DesiredState) -> int:
    """Sync every `--watch` seconds until interrupted: the fleet's controller, run anywhere."""
    if args.watch <= 0:
        raise SystemExit("arachne-mlflow fleet sync: --watch takes a number of seconds > 0")
    try:
        while True:
            started = time.monotonic()
            try:
                sync(args.names, options, state)
            except Exception as err:  # noqa: BLE001  (a registry that is down for a while must not stop the watch)
                _logger.error("fleet sync failed, trying again in %s s: %s", args.watch, err)
            time.sleep(max(0.0, args.watch - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
