"""`arachne-mlflow fleet status`, `fleet sync` and `fleet rollback`: the command line of status.py, fleet.py
and rollback.py.

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
from arachne_mlflow.deployments.fleet import Outcome, sync
from arachne_mlflow.deployments.inventory import find_inventory
from arachne_mlflow.deployments.rollback import rollback
from arachne_mlflow.deployments.status import EXIT_DRIFT, EXIT_OK, EXIT_USAGE
from arachne_mlflow.deployments.targets import settings
from arachne_mlflow.errors import ArachneError, InvalidInputError

_logger = logging.getLogger(__name__)


def run_fleet_command(args: argparse.Namespace) -> int:
    """Run one `fleet` command; its exit status (docs/deployments.md, "When something goes wrong").

    A fleet file named with --fleet or $ARACHNE_FLEET that is missing or wrong is a usage error
    (2), said before the registry is read."""
    from mlflow.exceptions import MlflowException

    config = {"fleet": args.fleet, "parallel": args.parallel}
    try:
        options = settings({k: v for k, v in config.items() if v is not None})
        find_inventory(options.fleet)
    except InvalidInputError as err:
        _logger.debug("usage error", exc_info=True)
        sys.stderr.write(f"arachne-mlflow fleet {args.fleet_command}: {err}\n")
        return EXIT_USAGE
    try:
        return _run(args, options, DesiredState())
    except MlflowException as err:
        raise ArachneError(f"the MLflow registry ({_tracking_uri()}) answered: {err}") from err


def _run(args: argparse.Namespace, options, state: DesiredState) -> int:
    if args.fleet_command == "status":
        found = fleet_status.status(args.names, options, state)
        sys.stdout.write(fleet_status.to_json(found) + "\n" if args.json else fleet_status.to_text(found))
        return fleet_status.exit_code(found)
    if args.fleet_command == "rollback":
        try:
            outcome = rollback(args.name, args.target, options, state)
        except InvalidInputError as err:  # no such deployment, a target the fleet file does not know
            sys.stderr.write(f"arachne-mlflow fleet rollback: {err}\n")
            return EXIT_USAGE
        if options.report:
            outcome.write()
        return outcome_code([outcome])
    if args.watch is None:
        return outcome_code(sync(args.names, options, state))
    return _watch(args, options, state)


def outcome_code(outcomes: list[Outcome]) -> int:
    """`fleet sync` and `fleet rollback`: 0 every deployment reached its desired state, 2 a name
    the registry does not know, 1 anything else left undone (see the report)."""
    if any(outcome.usage for outcome in outcomes):
        return EXIT_USAGE
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_DRIFT


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
