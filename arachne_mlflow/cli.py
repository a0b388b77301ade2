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
    from arachne_mlflow.errors import InvalidInputError

    try:
        options = json.loads(args.options) if args.options else {}
    except ValueError as err:
        raise InvalidInputError(f"--options must be a JSON object, e.g. '{{\"num_threads\": 2}}': {err}") from err
    if not isinstance(options, dict):
        raise InvalidInputError(f"--options must be a JSON object, e.g. '{{\"num_threads\": 2}}', got {args.options}")
    with runtime.init(args.runtime, model_file=args.model_file, env_file=args.env_file, **options) as module:
        result = module.benchmark(warmup=args.warmup, repeat=args.repeat, number=args.number)
    print(json.dumps(result, indent=2))
    return 0


_LEGACY_FLAGS = {"runtime": "--runtime (tflite, onnx or tvm)", "env_file": "--env-file (an env.yaml with model_spec)"}


def _import_legacy(args: argparse.Namespace) -> int:
    from arachne_mlflow.flavors.legacy import MissingLegacyArgumentError

    try:
        return _convert_legacy(args)
    except MissingLegacyArgumentError as err:
        raise err.naming(_LEGACY_FLAGS) from err


def _convert_legacy(args: argparse.Namespace) -> int:
    from arachne_mlflow.flavors.legacy import log_legacy_model, save_legacy_model

    source = {
        "package_tar": args.package_tar,
        "model_file": args.model_file,
        "env_file": args.env_file,
        "runtime": args.runtime,
    }
    if args.params_file:
        source["params_file"] = args.params_file
    if args.output:
        save_legacy_model(args.output, **source)
        print(args.output)
        return 0
    info = log_legacy_model(name=args.name, registered_model_name=args.registered_model_name, **source)
    print(info.model_uri)
    if info.registered_model_version is not None:
        print(f"models:/{args.registered_model_name}/{info.registered_model_version}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    import os

    from arachne_mlflow.flavors.signing import sign_model_version

    password = os.environ.get(args.password_env) if args.password_env else None
    signed = sign_model_version(args.model_uri, args.key, password)
    print(
        f"signed models:/{signed.registered_model}/{signed.version} with key {signed.key[:16]}... "
        f"at {signed.signed_at} (artifact {signed.artifact_path})"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from arachne_mlflow.flavors.signing import verify_model_version

    release = verify_model_version(args.model_uri, args.key)
    print(
        f"verified models:/{release.registered_model}/{release.version}: signed by {release.signer_source} "
        f"(key {release.signer[:16]}...) at {release.signed_at or 'an unrecorded time'}"
    )
    return 0


def _variants(args: argparse.Namespace) -> int:
    from arachne_mlflow.flavors.variants_cli import run_variants_command

    return run_variants_command(args)


def _profile(args: argparse.Namespace) -> int:
    from arachne_mlflow.profiling.commands import run

    return run(args)


def _capture(args: argparse.Namespace) -> int:
    from arachne_mlflow.capture.commands import run

    return run(args)


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
    bench.add_argument("--options", help="backend options as JSON, e.g. '{\"num_threads\": 2}'")
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--repeat", type=int, default=10)
    bench.add_argument("--number", type=int, default=1)
    bench.set_defaults(func=_benchmark)

    legacy = commands.add_parser(
        "import-legacy", help="convert an old Arachne package tar, or a model file and env.yaml, to an MLflow model"
    )
    source = legacy.add_mutually_exclusive_group(required=True)
    source.add_argument("--package-tar", help="an old Arachne package (model file + env.yaml)")
    source.add_argument("--model-file", help="a .tflite, .onnx or TVM library file")
    legacy.add_argument("--env-file", help="the model file's env.yaml")
    legacy.add_argument("--params-file", help="TVM: the detached weights (param-dict file)")
    legacy.add_argument("--runtime", choices=["tflite", "onnx", "tvm"], help="default: from the file name")
    target = legacy.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="save the MLflow model to this new directory")
    target.add_argument("--name", help="log the model under this name to the tracking server (MLFLOW_TRACKING_URI)")
    legacy.add_argument("--registered-model-name", help="with --name: also register it under this name")
    legacy.set_defaults(func=_import_legacy)

    from arachne_mlflow.server.main import add_arguments

    serve = commands.add_parser(
        "serve", help="run the device server (Open Inference Protocol over HTTP, and gRPC with --grpc-port)"
    )
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    from arachne_mlflow.deployments.commands import add_fleet_command

    add_fleet_command(commands)
    _add_signing(commands)
    _add_variants(commands)
    from arachne_mlflow.profiling.commands import add_parser as add_profile

    add_profile(commands, _profile)
    from arachne_mlflow.capture.commands import add_parser as add_capture

    add_capture(commands, _capture)
    return parser


def _add_signing(commands: argparse._SubParsersAction) -> None:
    """`sign` and `verify`: a registered model version's release signature (OpenSSF model-signing format)."""
    sign = commands.add_parser(
        "sign", help="sign a registered model version with a release key and store the signature with it"
    )
    sign.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    sign.add_argument("--key", required=True, metavar="PEM", help="the elliptic-curve private key (PEM)")
    sign.add_argument("--password-env", metavar="VAR", help="the variable holding the key's password, if encrypted")
    sign.set_defaults(func=_sign)
    verify = commands.add_parser(
        "verify", help="check that a registered model version is signed by a trusted key, as a device checks it"
    )
    verify.add_argument("model_uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    verify.add_argument(
        "--key",
        required=True,
        action="append",
        metavar="PUB",
        help="a trusted public key (PEM) or a directory of them (*.pub, *.pem); repeat for several",
    )
    verify.set_defaults(func=_verify)


def _add_variants(commands: argparse._SubParsersAction) -> None:
    """`variants build` and `variants show` (defined here: importing the flavor would import MLflow)."""
    variants = commands.add_parser("variants", help="one model version holding several builds of one network")
    actions = variants.add_subparsers(dest="variants_command", required=True)
    build = actions.add_parser(
        "build", help="build the usual variants of an ONNX file (as is, int8, TVM here, TVM for aarch64) into one model"
    )
    build.add_argument("onnx_file", metavar="MODEL.onnx")
    build.add_argument(
        "--builds",
        default="onnx,onnx-int8,tvm-host,tvm-aarch64",
        help="comma-separated, in the model's order (the first is the reference; default: %(default)s)",
    )
    build.add_argument("--input-example", metavar="FILE.npy", help="the example the variants are checked on")
    build.add_argument("--work-dir", metavar="DIR", help="keep each build here (default: a temporary directory)")
    target = build.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", metavar="DIR", help="save the model to this new directory")
    target.add_argument("--name", help="log the model under this name to the tracking server (MLFLOW_TRACKING_URI)")
    build.add_argument("--registered-model-name", help="with --name: also register it under this name")
    show = actions.add_parser("show", help="a model's variants, their checks, and which one this machine runs")
    show.add_argument("model_dir", metavar="MODEL_DIR")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    variants.set_defaults(func=_variants)


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. A user's mistake (a bad input, a missing file or device, a library not
    installed, an error MLflow reports) is one line on stderr and exit code 1; a bug keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        print(f"arachne-mlflow: error: {message}", file=sys.stderr)
        return 1


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix; None for a bug."""
    from arachne_mlflow.errors import ArachneError

    if isinstance(err, ArachneError):
        return _one_line(str(err))
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # (loaded when MLflow raised it)
    if mlflow_exceptions is not None and isinstance(err, mlflow_exceptions.MlflowException):
        return _one_line(err.message)
    if isinstance(err, OSError) and err.filename is not None:  # a path the user gave
        return _one_line(f"{err.strerror or err}: {err.filename}")
    return None


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


if __name__ == "__main__":
    sys.exit(main())
