"""`arachne-mlflow capture pull`: its flags and its run."""

from __future__ import annotations

import argparse
from typing import Any

from arachne_mlflow.errors import InvalidInputError


def add_parser(commands: argparse._SubParsersAction, handler: Any) -> None:
    capture = commands.add_parser("capture", help="field samples captured by devices, into MLflow")
    actions = capture.add_subparsers(dest="capture_command", required=True)
    pull = actions.add_parser(
        "pull",
        help="drain the capture spools of devices reached by push into the MLflow experiment arachne-capture",
        description="Each closed segment goes to the run of its (device, model, version, UTC day), is confirmed "
        "there, and only then deleted on the device.",
    )
    pull.add_argument("-t", "--target", required=True, help="arachne-jetson://HOST:PORT[,...], @group or device names")
    pull.add_argument("-m", "--model", action="append", help="a served model (repeat; default: every served model)")
    pull.add_argument("--registered-model", default="", help="the registered model, for samples that do not name it")
    pull.add_argument("--rollover", action="store_true", help="close each open segment first: deliver everything")
    pull.add_argument("--max-bps", type=float, help="bandwidth cap per device, bytes a second (default: none)")
    pull.add_argument("--max-segment-mb", type=float, default=1024, help="largest segment taken (default 1024)")
    pull.add_argument("-C", "--config", action="append", default=[], help="token=..., fleet=..., tls=true")
    capture.set_defaults(func=handler)


def run(args: argparse.Namespace) -> int:
    from arachne_mlflow.capture.pull import pull, render
    from arachne_mlflow.deployments.targets import config_pairs

    if not args.max_segment_mb > 0:
        raise InvalidInputError("--max-segment-mb must be more than 0")
    results = pull(
        args.target,
        args.model,
        config=config_pairs(args.config),
        registered_model=args.registered_model,
        rollover=args.rollover,
        max_bps=args.max_bps,
        max_segment_bytes=int(args.max_segment_mb * 1024 * 1024),
    )
    print(render(results))
    return 1 if any(result.error for result in results) else 0
