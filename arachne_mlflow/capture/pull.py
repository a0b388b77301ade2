"""`arachne-mlflow capture pull -t TARGET`: the host drains the capture spools of devices it reaches (push
mode) into the capture experiment, in the layout a pulling device writes itself.

Per device and model: (with `rollover`, the open segment is closed first), each closed segment,
oldest first, is downloaded (paced by the bandwidth cap), stored in its run with MLflow's client and
confirmed by listing, and only then deleted on the device. A failure leaves the segment on the device
for the next pull; stored again, it overwrites the same artifact, so nothing is counted twice.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arachne_mlflow.capture.device_segments import DeviceSegments
from arachne_mlflow.capture.runs import CaptureRuns
from arachne_mlflow.errors import ArachneError, InvalidInputError, ModelNotFoundError
from arachne_mlflow.fleet.device import SCHEME, Device
from arachne_mlflow.protocol import capture_runs

DEFAULT_MAX_SEGMENT_BYTES = 1024**3


@dataclass
class Drained:
    """What a pull did on one device: segments and bytes delivered, and the error that stopped it."""

    device: str
    segments: int = 0
    bytes: int = 0
    samples: int = 0
    error: str | None = None


def pull(
    target: str,
    models: list[str] | None = None,
    *,
    config: dict[str, str] | None = None,
    registered_model: str = "",
    rollover: bool = False,
    max_bps: float | None = None,
    max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
    client: Any = None,
) -> list[Drained]:
    """Drain `models` (default: every model the device serves) of each device of `target` (`@group`, device
    names or `host:port`, with or without `arachne-jetson://`) into MLflow."""
    from arachne_mlflow.deployments.targets import resolve_target, settings

    chosen = settings(config or {})
    devices = resolve_target(target if target.startswith(SCHEME) else f"{SCHEME}://{target}", chosen.fleet)
    if max_bps is not None and not max_bps > 0:
        raise InvalidInputError(f"--max-bps {max_bps}: give a positive number of bytes a second")
    runs = CaptureRuns(client)
    results = []
    for device in devices:
        routes = DeviceSegments(device, chosen.connection, max_segment_bytes, max_bps)
        result = Drained(str(device))
        try:
            for model in models or _served(device, chosen.connection):
                try:
                    _drain(routes, runs, model, registered_model, rollover, result)
                except ModelNotFoundError:
                    if models:  # (a served model need not capture; a named one must)
                        raise
        except ArachneError as err:
            result.error = str(err)
        finally:
            routes.close()
        results.append(result)
    return results


def _drain(routes: DeviceSegments, runs: CaptureRuns, model: str, registered: str, roll: bool, out: Drained) -> None:
    if roll:
        routes.rollover(model)
    origin = capture_runs.origins(routes.record(model))
    for name in routes.closed(model):
        with tempfile.TemporaryDirectory(prefix="arachne-capture-") as temporary:
            segment = routes.download(model, name, Path(temporary))
            summary = capture_runs.summarize_segment(segment)  # (one sample at a time: never all in memory)
            if summary.count:
                runs.store(runs.run_for(summary.heads, origin, registered), model, segment)
            routes.delete(model, name)
            out.segments, out.bytes, out.samples = (
                out.segments + 1,
                out.bytes + segment.stat().st_size,
                out.samples + summary.count,
            )


def _served(device: Device, connection: Any) -> list[str]:
    with connection.client(device) as client:
        return [entry["name"] for entry in client.repository_index() if isinstance(entry.get("name"), str)]


def render(results: list[Drained]) -> str:
    rows = [f"{'device':<24} {'segments':>8} {'samples':>8} {'bytes':>12}  error"]
    for r in results:
        rows.append(f"{r.device[:24]:<24} {r.segments:>8} {r.samples:>8} {r.bytes:>12}  {r.error or ''}")
    return "\n".join(rows)
