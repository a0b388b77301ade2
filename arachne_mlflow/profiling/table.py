"""A profile as the table a team reads: one line per (device, variant)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("kind", "device", "variant", "load_ms", "first_ms", "p50_ms", "p90_ms", "p99_ms", "mem_mb", "model_mb")
_METRIC = {
    "load_ms": "load_ms",
    "first_ms": "first_inference_ms",
    "p50_ms": "p50_ms",
    "p90_ms": "p90_ms",
    "p99_ms": "p99_ms",
    "mem_mb": "memory_growth_mb",
    "model_mb": "model_mb",
}


def render(result: Any) -> str:
    """The rows, then each kind's fastest agreeing variant, then how the repeats were spread."""
    lines = [[*COLUMNS, "agrees", "note"]]
    for row in result.rows:
        m = row.measurement
        figures = [_number((m.metrics if m else {}).get(_METRIC[c])) for c in COLUMNS[3:]]
        agrees = "" if not m or m.error else ("yes" if m.agreement.get("within_tolerance") else "NO")
        note = row.skipped and f"skipped: {row.skipped}" or (m.error if m and m.error else "")
        note = note or (m.agreement.get("summary", "") if m else "")
        lines.append([row.kind.key if row.kind else "?", row.device, row.variant, *figures, agrees, note])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]) - 1)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1]) for line in lines]
    plan = result.plan
    text.append(
        f"timings: the device's clock, {plan.repeats} repeats after {plan.warmup} warm-up runs in one benchmark "
        f"call (each run timed alone); inputs compared: {result.inputs.source}"
    )
    for key, best in sorted(result.summary.items()):
        if best.get("variant"):
            text.append(
                f"fastest within tolerance on {key} ({best.get('label', '')}): {best['variant']}, "
                f"p50 {best['p50_ms']} ms"
            )
        else:
            text.append(f"on {key}: {best.get('reason')}")
    return "\n".join(text)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
