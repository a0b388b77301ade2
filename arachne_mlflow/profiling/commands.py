"""`arachne-mlflow profile MODEL_URI -t TARGET`: the command around `profile_model`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError


def add_parser(commands: argparse._SubParsersAction, handler: Any) -> None:
    profile = commands.add_parser(
        "profile",
        help="measure each variant of a model version on each kind of device of a target, into MLflow",
        description="Each variant runs under a scratch name (removed afterwards) on one device per kind "
        "(architecture, runtimes and their versions, providers, TVM devices); one MLflow run per "
        "(variant, kind) in the experiment arachne-profile/<registered model>; the model version's tag "
        "arachne.profile names each kind's fastest variant within tolerance.",
    )
    profile.add_argument("model_uri", help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/..., a path")
    profile.add_argument("-t", "--target", required=True, help="arachne-jetson://HOST:PORT[,...] or @group")
    profile.add_argument("--repeats", type=int, default=100, help="timed runs per variant and device (default 100)")
    profile.add_argument("--warmup", type=int, default=10, help="untimed runs before them (default 10)")
    profile.add_argument("--every-device", action="store_true", help="every device, not one per kind")
    profile.add_argument("--data", help="a CSV or Parquet file: the inputs (a sample of --sample-rows rows)")
    profile.add_argument("--targets", help="a column of --data: evaluate each variant on the device (a classifier)")
    profile.add_argument("--sample-rows", type=int, default=256, help="rows of --data used (default 256)")
    profile.add_argument("--max-mb", type=float, default=512, help="largest variant put on a device (default 512)")
    profile.add_argument("--no-log", action="store_true", help="print the table only; nothing is written to MLflow")
    profile.add_argument("-C", "--config", action="append", default=[], help="token=..., fleet=..., parallel=N")
    profile.set_defaults(func=handler)


def run(args: argparse.Namespace) -> int:
    from arachne_mlflow.deployments.targets import config_pairs
    from arachne_mlflow.profiling.measure import Plan
    from arachne_mlflow.profiling.profile import check_plan, profile_model
    from arachne_mlflow.profiling.table import render

    check_plan(args.repeats, args.warmup)
    if not 1 <= args.sample_rows <= 100_000 or not args.max_mb > 0:
        raise InvalidInputError("--sample-rows must be in [1, 100000] and --max-mb more than 0")
    plan = Plan(args.repeats, args.warmup, int(args.max_mb * 1024 * 1024), sample_rows=args.sample_rows)
    result = profile_model(
        args.model_uri,
        args.target,
        config=config_pairs(args.config),
        plan=plan,
        every_device=args.every_device,
        data=_read_data(args.data),
        targets=args.targets,
        log=not args.no_log,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(render(result))
    return 1 if result.failed else 0


def _read_data(path: str | None) -> Any:
    if path is None:
        return None
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"--data {path}: no such file")
    return pd.read_parquet(file) if file.suffix in {".parquet", ".pq"} else pd.read_csv(file)
