"""`python -m benchmarks [--quick] [--only SUITE ...] [--peers] [--out DIR]`: run, print, write JSON + Markdown.

`--peers` adds the peer servers' suite (MLServer, KServe, `mlflow models serve`), which installs
them into venvs of their own under benchmarks/.cache/peers on first use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from benchmarks import models, report

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before MLflow is imported: no calls out

SUITES = [
    "runtime",
    "pyfunc",
    "remote",
    "throughput",
    "batching",
    "deploy",
    "cold_start",
    "tricks",
    "fleet",
    "signing",
    "profile",
    "pull",
    "shm",
    "capture",
    "capture_upload",
]
OPTIONAL_SUITES = ["peers"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, few iterations")
    parser.add_argument("--only", nargs="+", choices=SUITES + OPTIONAL_SUITES, help="run only these suites")
    parser.add_argument("--peers", action="store_true", help="also run the peers suite (installs the peer servers)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    started = time.time()
    print("building models (cached after the first run) ...", file=sys.stderr, flush=True)
    built = models.build_all(args.quick)
    rows = []
    for name in args.only or SUITES + (OPTIONAL_SUITES if args.peers else []):
        print(f"suite {name} ...", file=sys.stderr, flush=True)
        suite = importlib.import_module(f"benchmarks.suites.{name}")
        suite_rows = suite.run(built, args.quick)
        rows += suite_rows
        if hasattr(suite, "markdown"):  # a suite with a table of its own (peers)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.md").write_text(suite.markdown(suite_rows))
            print(suite.markdown(suite_rows), file=sys.stderr)
    json_path, md_path = report.write(rows, args.out, {"quick": args.quick, "seconds": round(time.time() - started, 1)})
    print(report.markdown(rows))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
