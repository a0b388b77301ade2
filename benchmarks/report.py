"""The benchmark report: JSON for machines, a Markdown table for docs/performance.md."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def write(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "machine": platform.machine(), "python": platform.python_version()}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(rows))
    return json_path, md_path


def markdown(rows: list[dict[str, Any]]) -> str:
    """Side-by-side comparisons in one table, the other measurements (throughput, ...) in another."""
    compared = [r for r in rows if "baseline" in r]
    measured = [r for r in rows if "baseline" not in r]
    text = _comparisons(compared) if compared else ""
    if measured:
        text += ("\n" if text else "") + _measurements(measured)
    return text


_SKIP = {"suite", "case", "target", "met", "detail"}


def _measurements(rows: list[dict[str, Any]]) -> str:
    lines = ["| suite | case | figures | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        figures = ", ".join(f"{k} {_number(v)}" for k, v in r.items() if k not in _SKIP)
        lines.append(f"| {r['suite']} | {r['case']} | {figures} | {r.get('target') or ''} | {_met(r.get('met'))} |")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _comparisons(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| suite | case | baseline | candidate | baseline median (min–max) | candidate median (min–max) "
        "| ratio | Δ per call | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['suite']} | {r['case']} | {r['baseline']} | {r['candidate']} "
            f"| {_ms(r['baseline_ms'])} | {_ms(r['candidate_ms'])} | {r.get('ratio_median', float('nan')):.3f}x "
            f"| {_us(r.get('overhead_us_median'))} | {r.get('target') or ''} | {_met(r.get('met'))} |"
        )
    return "\n".join(lines) + "\n"


def _ms(s: dict[str, float]) -> str:
    return f"{_fmt(s['median_ms'])} ({_fmt(s['min_ms'])}–{_fmt(s['max_ms'])})"


def _fmt(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f} µs"


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[value]
