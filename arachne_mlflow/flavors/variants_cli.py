"""`arachne-mlflow variants build` and `variants show`: progress and tables on the terminal."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.variants import choose_variant, requirements, this_machine, unmet_requirements


def run_variants_command(args: argparse.Namespace) -> int:
    if args.variants_command == "build":
        return _build(args)
    return _show(args)


def _build(args: argparse.Namespace) -> int:
    from arachne_mlflow.flavors import variants, variants_build

    example = _read_example(args.input_example)
    builds = [b.strip() for b in args.builds.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="arachne-variants-") as scratch:
        work_dir = Path(args.work_dir) if args.work_dir else Path(scratch) / "builds"
        progress = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        built = variants_build.build_variants(args.onnx_file, work_dir, builds, progress=progress)
        model = {name: build.variant for name, build in built.items()}
        progress("checking the variants against the reference on the input example ...")
        if args.output:
            variants.save_model(model, args.output, input_example=example)
            checks = read_model_dir(args.output).variants
            print(_build_table(built, {v.variant_name: v.check for v in checks}))
            print(args.output)
            return 0
        info = variants.log_model(
            model, name=args.name, registered_model_name=args.registered_model_name, input_example=example
        )
    blocks = info.flavors["arachne"]["variants"]
    print(_build_table(built, {block["name"]: block.get("check", {}) for block in blocks}))
    print(info.model_uri)
    if info.registered_model_version is not None:
        print(f"models:/{args.registered_model_name}/{info.registered_model_version}")
    return 0


def _read_example(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"--input-example {path}: not a .npy array ({err})") from err


def _build_table(built: dict[str, Any], checks: dict[str, dict[str, Any]]) -> str:
    rows = [("VARIANT", "SECONDS", "BYTES", "MAX ABS DIFF", "TOP-1", "CHECK")]
    for name, build in built.items():
        check = checks.get(name, {})
        rows.append(
            (
                name,
                f"{build.seconds:.1f}",
                str(build.bytes),
                _figure(check.get("max_abs_diff")),
                _figure(check.get("top1_agreement")),
                _check_words(check),
            )
        )
    return _table(rows)


def _show(args: argparse.Namespace) -> int:
    model = read_model_dir(args.model_dir, check_files=False)
    machine = this_machine(model.variants)
    choice = choose_variant(model.variants, machine)
    chosen = choice.variant.variant_name if choice.variant else None
    if args.json:
        listing = [
            {"name": v.variant_name, "runtime": v.runtime, "requires": requirements(v), "check": v.check}
            for v in model.variants
        ]
        print(json.dumps({"variants": listing, "this_machine": chosen, "reasons": choice.reasons}, indent=2))
        return 0
    rows = [("VARIANT", "RUNTIME", "REQUIRES", "MAX ABS DIFF", "TOP-1", "CHECK", "HERE")]
    for v in model.variants:
        needs = {k: val for k, val in requirements(v).items() if k != "runtime"}
        unmet = unmet_requirements(v, machine)
        here = "; ".join(unmet) or ("runs, chosen" if v.variant_name == chosen else "runs")
        rows.append(
            (
                v.variant_name,
                v.runtime,
                json.dumps(needs) if needs else "-",
                _figure(v.check.get("max_abs_diff")),
                _figure(v.check.get("top1_agreement")),
                _check_words(v.check),
                here,
            )
        )
    print(_table(rows))
    return 0


def _check_words(check: dict[str, Any]) -> str:
    if check.get("reference"):
        return "reference"
    if check.get("ran"):
        return "within tolerance"
    return "signature only" if check else "-"


def _figure(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3g}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
