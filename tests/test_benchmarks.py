"""The benchmarks' quick mode runs end to end (no thresholds: figures on a shared CI box are noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import SUITES

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_every_suite(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    suites = {row["suite"] for row in report["rows"]}
    assert suites == {name.replace("_", " ") for name in SUITES}
    errors_counted = ("throughput", "batching", "fleet")
    assert all(row["errors"] == 0 for row in report["rows"] if row["suite"] in errors_counted)
    assert all(row["outputs_equal"] for row in report["rows"] if row["suite"] == "batching")
    assert not any(row.get("imported_tensorflow") for row in report["rows"])
    assert "| runtime | tiny/onnx |" in (tmp_path / "results.md").read_text()


def test_the_asgi_server_comparison_says_why_it_does_not_run_without_granian(tmp_path):
    """Granian is no dependency (docs/performance.md): without it the script exits 0 and says why."""
    hide_granian = "import sys; sys.modules['granian'] = None"  # (whether or not this environment has it)
    run = f"{hide_granian}; from benchmarks.asgi_servers import main; sys.exit(main(['--out', {str(tmp_path)!r}]))"
    result = subprocess.run([sys.executable, "-c", run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "granian is not installed" in result.stdout
    assert not any(tmp_path.iterdir())
