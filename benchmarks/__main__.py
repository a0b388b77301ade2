"""`python -m benchmarks [--quick] [--only SUITE ...] [--out DIR]`: run, print, write JSON + Markdown."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from benchmarks import models, report

SUITES = ["runtime", "pyfunc", "remote", "throughput", "deploy", "cold_start", "tricks"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, few iterations")
    parser.add_argument("--only", nargs="+", choices=SUITES, help="run only these suites")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    started = time.time()
    print("building models (cached after the first run) ...", file=sys.stderr, flush=True)
    built = models.build_all(args.quick)
    rows = []
    for name in args.only or SUITES:
        print(f"suite {name} ...", file=sys.stderr, flush=True)
        suite = importlib.import_module(f"benchmarks.suites.{name}")
        rows += suite.run(built, args.quick)
    json_path, md_path = report.write(rows, args.out, {"quick": args.quick, "seconds": round(time.time() - started, 1)})
    print(report.markdown(rows))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
