"""Per-device reports: the table a fleet command prints on stderr, and the one-line summaries of errors.

MLflow's CLI shows one line of what `create`/`update` returned, so the plugin writes the table
itself: every device with what it had before, what it has after, what happened, how long it took
and why it failed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from arachne_mlflow.deployments.results import DeviceResult

MAX_ERROR_COLUMN = 160  # characters of an error in a table row (the exception has all of it)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain-text table, columns padded to their widest cell, the last one left ragged."""
    cells = [[str(h) for h in headers]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def results_table(results: Sequence[DeviceResult]) -> str:
    """One row per device; a `variant` column after `after` when the model has variants."""
    variants = any(r.variant for r in results)
    rows = (
        (r.device, r.before, r.after, *([r.variant or ""] if variants else []), r.state, f"{r.seconds:.2f}")
        + (_short(r.error or "", MAX_ERROR_COLUMN),)
        for r in results
    )
    headers = ("device", "before", "after", *(["variant"] if variants else []), "state", "seconds", "error")
    return table(headers, rows)


def write(text: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    stream.write(text)
    stream.flush()


def failures(results: Iterable[DeviceResult], limit: int = 20) -> str:
    """`cam-3: <error>; cam-4: <error>` for the failed devices (the first `limit`, then a count)."""
    failed = [r for r in results if not r.ok]
    text = "; ".join(f"{r.device}: {r.error}" for r in failed[:limit])
    return text + (f"; and {len(failed) - limit} more" if len(failed) > limit else "")


def by_state(results: Iterable[DeviceResult], limit: int = 20) -> str:
    """`rolled-back: cam-0, cam-1; untouched: cam-2`: which devices ended in which state (the first
    `limit` of each, then a count)."""
    groups: dict[str, list[str]] = {}
    for result in results:
        groups.setdefault(result.state, []).append(str(result.device))
    return "; ".join(
        f"{state}: {', '.join(names[:limit])}" + (f" and {len(names) - limit} more" if len(names) > limit else "")
        for state, names in groups.items()
    )


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
