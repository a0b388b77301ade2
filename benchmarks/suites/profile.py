"""`profile` on two local device servers: the tiny model and MobileNetV2, each as ONNX, int8 ONNX
and TVM variants of one model. Reports the profile's own overhead (its wall time against the sum of
the timings it reports: load, first inference, the timed runs) and the spread of each variant's
p50 across three profiles of the same devices ((max - min) / median).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.servers import device_servers

BUILDS = ["onnx", "onnx-int8", "tvm-host"]


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import variants, variants_build
    from arachne_mlflow.profiling import Plan, profile_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        tmp = Path(tmp)
        with device_servers([tmp / "store-a", tmp / "store-b"]) as ports:
            target = "arachne-jetson://" + ",".join(f"127.0.0.1:{port}" for port in ports)
            for name, repeats in (("tiny", 200), ("mobilenet", 20 if quick else 50)):
                builds = variants_build.build_variants(models[f"{name}/onnx"]["model_file"], tmp / name, BUILDS)
                model_dir = tmp / f"{name}-model"
                variants.save_model({n: b.variant for n, b in builds.items()}, model_dir)
                plan = Plan(repeats=repeats, warmup=5)
                p50s: dict[tuple[str, str], list[float]] = {}
                for _ in range(3):
                    start = time.perf_counter()
                    result = profile_model(str(model_dir), target, plan=plan, every_device=True, log=False)
                    wall_ms = (time.perf_counter() - start) * 1000
                    reported = 0.0
                    for row in result.rows:
                        m = row.measurement
                        if m is None or not m.ok:
                            continue
                        p50s.setdefault((row.device, row.variant), []).append(m.metrics["p50_ms"])
                        reported += m.metrics["load_ms"] + m.metrics["first_inference_ms"]
                        reported += m.repeats_done * m.metrics["mean_ms"]
                    rows.append(_overhead_row(name, repeats, wall_ms, reported))
                for (device, variant), values in sorted(p50s.items()):
                    rows.append(_spread_row(name, device, variant, values))
    return rows


def _overhead_row(model: str, repeats: int, wall_ms: float, reported_ms: float) -> dict:
    return {
        "suite": "profile",
        "case": f"{model}: 3 variants x 2 devices, {repeats} repeats: wall vs reported",
        "wall_s": round(wall_ms / 1000, 2),
        "reported_s": round(reported_ms / 1000, 3),
        "overhead_x": round(wall_ms / reported_ms, 1) if reported_ms else None,
        "target": None,
        "met": None,
    }


def _spread_row(model: str, device: str, variant: str, values: list[float]) -> dict:
    median = statistics.median(values)
    return {
        "suite": "profile",
        "case": f"{model}/{variant} on {device}: p50 over 3 profiles",
        "p50_ms": [round(v, 4) for v in values],
        "spread_pct": round(100 * (max(values) - min(values)) / median, 1) if median else None,
        "target": None,
        "met": None,
    }
