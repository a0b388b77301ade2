"""`arachne-mlflow fleet status`, `fleet sync`, `fleet rollback` and `fleet pull-rollout`: their flags, and the
command line of status.py, operations.py, rollback.py and pull_rollout.py.

The registry is MLflow's (`MLFLOW_TRACKING_URI`); connection settings come from the
environment (`ARACHNE_TOKEN`, `ARACHNE_TLS`, ...) and the fleet file, as for the plugin's
`list`, `get` and `predict`. The `arachne-mlflow` parser imports this module for every command,
so what imports MLflow is imported when a `fleet` command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from arachne_mlflow import reconcile
from arachne_mlflow.errors import ArachneError, InvalidInputError

_logger = logging.getLogger(__name__)


def add_fleet_command(commands: argparse._SubParsersAction) -> None:
    """`fleet status`, `fleet sync` and `fleet rollback` under `commands` (the `arachne-mlflow` parser's)."""
    fleet = commands.add_parser("fleet", help="what the MLflow registry wants on the devices, against what they run")
    actions = fleet.add_subparsers(dest="fleet_command", required=True)
    status = actions.add_parser("status", help="desired vs actual version on every device, and the drift")
    status.add_argument("names", nargs="*", metavar="NAME", help="deployments to show (default: every one)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sync = actions.add_parser("sync", help="bring every device of each deployment to the registry's desired state")
    sync.add_argument("names", nargs="*", metavar="NAME", help="deployments to sync (default: every one)")
    sync.add_argument("--watch", type=float, metavar="SECONDS", help="sync again every SECONDS until interrupted")
    rollback = actions.add_parser(
        "rollback", help="every device of a deployment back to its previous version (instant where the device kept it)"
    )
    rollback.add_argument("name", metavar="NAME", help="the deployment")
    rollback.add_argument(
        "--target", metavar="TARGET", help="devices to roll back: @group, names or host:port (default: the registry's)"
    )
    pull = actions.add_parser(
        "pull-rollout", help="a staged rollout to devices that follow an alias: canary first, then waves"
    )
    pull.add_argument("name", metavar="NAME", help="the deployment (the name the devices serve the model as)")
    pull.add_argument("model_uri", metavar="MODEL_URI", help="the version to roll out (models:/NAME/3)")
    pull.add_argument(
        "--alias", required=True, help="the alias the devices follow (serve --follow NAME=models:/M@ALIAS)"
    )
    pull.add_argument("--target", metavar="TARGET", help="the devices: @group or names (default: the registry's)")
    pull.add_argument(
        "-C",
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy, canary, batch, "
        "max_failures, wave_timeout, poll, min_success, progress, report (as a push's -C)",
    )
    for action in (status, sync, rollback, pull):
        action.add_argument(
            "--fleet", metavar="PATH", help="the fleet file (default $ARACHNE_FLEET or ~/.arachne-mlflow/fleet.yaml)"
        )
        action.add_argument("--parallel", type=int, metavar="N", help="devices worked on at once (default: all)")
    fleet.set_defaults(func=run_fleet_command)


def run_fleet_command(args: argparse.Namespace) -> int:
    """Run one `fleet` command; its exit status (docs/deployments.md, "When something goes wrong").

    A fleet file named with --fleet or $ARACHNE_FLEET that is missing or wrong is a usage error
    (2), said before the registry is read."""
    from mlflow.exceptions import MlflowException

    from arachne_mlflow.deployments.desired_state import DesiredState
    from arachne_mlflow.deployments.status import EXIT_USAGE
    from arachne_mlflow.deployments.targets import settings
    from arachne_mlflow.fleet.inventory import find_inventory

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


def _run(args: argparse.Namespace, options, state) -> int:
    from arachne_mlflow.deployments import status as fleet_status
    from arachne_mlflow.deployments.operations import sync
    from arachne_mlflow.deployments.rollback import rollback
    from arachne_mlflow.deployments.status import EXIT_USAGE

    if args.fleet_command == "status":
        found = fleet_status.status(args.names, options, state)
        sys.stdout.write(fleet_status.to_json(found) + "\n" if args.json else fleet_status.to_text(found))
        return fleet_status.exit_code(found)
    if args.fleet_command == "pull-rollout":
        return _pull_rollout(args, options, state)
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


def _pull_rollout(args: argparse.Namespace, options, state) -> int:
    """`fleet pull-rollout`: its settings, its plan and its waves (deployments/pull_rollout.py)."""
    from arachne_mlflow.deployments.operations import Outcome
    from arachne_mlflow.deployments.pull_rollout import plan_of, pull_rollout, pull_settings
    from arachne_mlflow.deployments.status import EXIT_USAGE
    from arachne_mlflow.deployments.targets import SCHEME, resolve_target, target_of

    config = dict(item.partition("=")[::2] for item in args.config)
    config.update({"fleet": options.fleet} if options.fleet else {})
    try:
        pull_options, waits = pull_settings(config)
        existing = state.find(args.name)
        target = args.target or (existing.target if existing else None)
        if target is None:
            raise InvalidInputError(f"the registry records no deployment {args.name!r}: name its devices with --target")
        devices = resolve_target(f"{SCHEME}://{target}", pull_options.fleet, recorded=args.target is None)
        plan = plan_of(args.name, args.model_uri, args.alias, target_of(f"{SCHEME}://{target}"), state.client)
    except InvalidInputError as err:
        sys.stderr.write(f"arachne-mlflow fleet pull-rollout: {err}\n")
        return EXIT_USAGE
    if plan.from_version == plan.version:
        outcome = Outcome("pull-rollout", args.name, note=f"the alias {args.alias!r} names v{plan.version} already")
    else:
        outcome = pull_rollout(plan, devices, pull_options, waits, state, existing)
    if pull_options.report:
        outcome.write()
    return outcome_code([outcome])


def outcome_code(outcomes: list[Any]) -> int:
    """`fleet sync` and `fleet rollback` (their `operations.Outcome`s): 0 every deployment reached its
    desired state, 2 a name the registry does not know, 1 anything else left undone (see the report)."""
    from arachne_mlflow.deployments.status import EXIT_DRIFT, EXIT_OK, EXIT_USAGE

    if any(outcome.usage for outcome in outcomes):
        return EXIT_USAGE
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_DRIFT


def _watch(args: argparse.Namespace, options, state) -> int:
    """Sync every `--watch` seconds until interrupted: the fleet's controller, run anywhere. A sync that
    fails (a registry that is down for a while) is logged and tried again at the next period."""
    from arachne_mlflow.deployments.operations import sync

    if args.watch <= 0:
        raise SystemExit("arachne-mlflow fleet sync: --watch takes a number of seconds > 0")

    def one_sync() -> reconcile.Outcome:
        sync(args.names, options, state)
        return reconcile.DONE

    def failed(err: Exception, delay: float) -> None:
        _logger.error("fleet sync failed, trying again in %s s: %s", args.watch, err)

    try:
        reconcile.run(one_sync, reconcile.Schedule(args.watch, from_start=True), threading.Event(), on_error=failed)
    except KeyboardInterrupt:
        pass
    return 0


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
