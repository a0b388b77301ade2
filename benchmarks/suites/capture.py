"""What field capture costs the answer: p99 latency with capture off, at 1% and at 100%, and the spool's
write throughput.

One device server holds the same model three times: `off` (no rules), `c1` (rate 0.01) and `c100`
(rate 1), set through the capture route. Requests go round-robin over the three, the order rotated
each cycle, so that machine noise hits all alike; the p99 of each is taken per block of cycles and
the blocks' median ratio against `off` is the figure (target: at most +2% at 1%). The throughput row
offers MobileNet-sized samples to a `Capture` in this process as fast as it takes them and times
the writer thread until every one is on disk.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.model.capture_rules import CaptureRules
from arachne_mlflow.runtime import random_tensor
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from arachne_mlflow.server.capture import Capture
from arachne_mlflow.server.capture.writer import SampleQueue
from benchmarks.servers import device_server

RATES = {"off": None, "c1": 0.01, "c100": 1.0}
TARGET_P99 = 1.02


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import onnx as arachne_onnx

    blocks, cycles = (4, 100) if quick else (12, 500)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, device_server(Path(tmp) / "store") as (port, _, _):
        for model in ("tiny", "mobilenet"):
            onnx_file = models[f"{model}/onnx"]["model_file"]
            model_dir = Path(tmp) / model
            arachne_onnx.save_model(onnx_file, str(model_dir))
            names = {f"{model}-{suffix}": rate for suffix, rate in RATES.items()}
            _deploy(port, model_dir, names)
            x = random_tensor(ONNXRuntimeModule(onnx_file).input_specs[0])
            latencies = _round_robin(port, list(names), x, blocks, cycles)
            counts = _capture_counts(port)
            off = f"{model}-off"
            for name in names:
                if name != off:
                    rows.append(_row(model, name, names[name], latencies[off], latencies[name], counts))
        rows.append(_spool_throughput(models["mobilenet/onnx"]["model_file"], 200 if quick else 1000))
    return rows


def _deploy(port: int, model_dir: Path, names: dict[str, float | None]) -> None:
    with DeviceClient("127.0.0.1", port) as client:
        for name, rate in names.items():
            client.upload_model(name, model_dir)
            if rate is not None:
                url = f"http://127.0.0.1:{port}/v2/repository/models/{name}/capture"
                requests.put(url, json={"rate": rate}, timeout=30).raise_for_status()


def _round_robin(port: int, names: list[str], x: np.ndarray, blocks: int, cycles: int) -> dict[str, list[list[float]]]:
    """Per name, per block, each request's latency in seconds."""
    latencies = {name: [[] for _ in range(blocks)] for name in names}
    with DeviceClient("127.0.0.1", port) as client:
        for name in names:
            for _ in range(20):
                client.infer(name, [x])
        for block in range(blocks):
            for cycle in range(cycles):
                shift = cycle % len(names)
                for name in names[shift:] + names[:shift]:
                    start = time.perf_counter()
                    client.infer(name, [x])
                    latencies[name][block].append(time.perf_counter() - start)
    return latencies


def _capture_counts(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("arachne_capture_") and "_total{" in line:
            counts[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return counts


def _row(model: str, name: str, rate: float, off: list[list[float]], on: list[list[float]], counts: dict) -> dict:
    ratios = [_p99(b_on) / _p99(b_off) for b_off, b_on in zip(off, on)]
    ratio = statistics.median(ratios)
    captured = counts.get(f'arachne_capture_captured_total{{model="{name}"}}', 0.0)
    dropped = sum(v for k, v in counts.items() if k.startswith(f'arachne_capture_dropped_total{{model="{name}"'))
    flat_off, flat_on = np.concatenate(off), np.concatenate(on)
    return {
        "suite": "capture",
        "case": f"{model}/onnx, capture at {rate:.0%} vs off",
        "requests_each": int(flat_on.size),
        "off_p50_ms": float(np.percentile(flat_off, 50) * 1e3),
        "off_p99_ms": float(np.percentile(flat_off, 99) * 1e3),
        "on_p50_ms": float(np.percentile(flat_on, 50) * 1e3),
        "on_p99_ms": float(np.percentile(flat_on, 99) * 1e3),
        "p99_ratio_median": ratio,
        "p99_ratio_min": min(ratios),
        "p99_ratio_max": max(ratios),
        "captured": captured,
        "dropped": dropped,
        "target": f"p99 <= {TARGET_P99:.2f}x off at 1%" if rate < 1 else "reported",
        "met": ratio <= TARGET_P99 if rate < 1 else None,
    }


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def _spool_throughput(onnx_file: str, count: int) -> dict:
    module = ONNXRuntimeModule(onnx_file)
    x = random_tensor(module.input_specs[0])
    y = module.infer([x])[0]
    rules = CaptureRules(rate=1.0, budget_mb=4096.0)
    with tempfile.TemporaryDirectory() as tmp:
        capture = Capture(Path(tmp), lambda n: None, lambda n: None, seed=0, queue=SampleQueue(count + 1, 1 << 40))
        started = time.perf_counter()
        for _ in range(count):
            capture.offer("m", "1", rules, {"x": x}, {"y": y})
        offered = time.perf_counter() - started
        deadline = time.monotonic() + 600
        while capture.counts.captured.get("m", 0) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        written = time.perf_counter() - started
        capture.close()
        on_disk = sum(path.stat().st_size for path in (Path(tmp) / ".capture" / "m").iterdir())
    return {
        "suite": "capture",
        "case": f"spool write throughput, {x.nbytes // 1024} KiB input + output per sample",
        "samples": count,
        "samples_per_s": count / written,
        "mb_per_s": on_disk / written / 1e6,
        "offer_us_per_sample": offered / count * 1e6,
        "target": "reported",
        "met": None,
    }
