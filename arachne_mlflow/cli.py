"""The `arachne-mlflow` command."""

from __future__ import annotations

import argparse
import json
import sys

from arachne_mlflow import __version__


def _runtimes(args: argparse.Namespace) -> int:
    from arachne_mlflow import runtime

    for name in runtime.list_runtimes():
        print(name)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from arachne_mlflow import runtime

    options = json.loads(args.options) if args.options else {}
    with runtime.init(args.runtime, model_file=args.model_file, env_file=args.env_file, **options) as module:
        result = module.benchmark(warmup=args.warmup, repeat=args.repeat, number=args.number)
    print(json.dumps(result, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from arachne_mlflow.server.main import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arachne-mlflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"arachne-mlflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    runtimes = commands.add_parser("runtimes", help="list the runtime backends")
    runtimes.set_defaults(func=_runtimes)

    bench = commands.add_parser("benchmark", help="time a model with the unified runtime")
    bench.add_argument("runtime")
    bench.add_argument("model_file")
    bench.add_argument("--env-file")
    bench.add_argument("--options", help='backend options as JSON, e.g. \'{"num_threads": 2}\'')
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--repeat", type=int, default=10)
    bench.add_argument("--number", type=int, default=1)
    bench.set_defaults(func=_benchmark)

    from arachne_mlflow.server.main import add_arguments

    serve = commands.add_parser("serve", help="run the device server (Open Inference Protocol over HTTP)")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from arachne_mlflow.errors import ArachneError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ArachneError as err:
        print(f"arachne-mlflow: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
