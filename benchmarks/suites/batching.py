"""Throughput under load on the device server: dynamic batching on vs off, and the server's own cost.

- The MLP (12 MiB of weights) under 1, 4 and 16 tritonclient clients, served twice by one server,
  once plain and once with `--batching`, the two measured in interleaved rounds. The target (16
  clients): batching gives >= 2x the requests/s with a p99 no worse than 1.5x.
- The tiny model under one client: the server's CPU time per request (user + system, from /proc),
  <= 120 µs. That is the whole per-request path (HTTP, decode, run, encode) with the default
  settings, access log off.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path

import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.runtime import random_tensor
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from benchmarks import load
from benchmarks.servers import device_server

BATCHING = "16,500"  # max_batch_size 16, max_queue_delay_microseconds 500
TARGET_SPEEDUP = 2.0
TARGET_P99 = 1.5
TARGET_CPU_US = 120.0


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import onnx as arachne_onnx

    rounds, seconds = (1, 0.5) if quick else (5, 4.0)
    rows = []
    extra = ("--log-level", "info", "--batching", f"mlp_batched={BATCHING}")  # the default log level
    with tempfile.TemporaryDirectory() as tmp, device_server(Path(tmp) / "store", extra) as (port, process, _):
        for name, key in (("tiny", "tiny/onnx"), ("mlp", "mlp/onnx"), ("mlp_batched", "mlp/onnx")):
            arachne_onnx.save_model(models[key]["model_file"], str(Path(tmp) / name))
            with DeviceClient("127.0.0.1", port) as client:
                client.upload_model(name, Path(tmp) / name)
        target = load.Target("arachne", port, process.pid)
        rows.append(_server_cost(target, models["tiny/onnx"]["model_file"], rounds, seconds))
        mlp = ONNXRuntimeModule(models["mlp/onnx"]["model_file"])
        x = random_tensor(mlp.input_specs[0])
        expected = mlp.infer([x])[0]
        calls = {name: load.caller(target, name, x, binary=True) for name in ("mlp", "mlp_batched")}
        equal = all(load.check(make, expected) for make in calls.values())
        for clients in (1, 4, 16):
            rows.append(_on_vs_off(target, calls, clients, rounds, seconds, equal))
    return rows


def _server_cost(target: load.Target, onnx_file: str, rounds: int, seconds: float) -> dict:
    module = ONNXRuntimeModule(onnx_file)
    x = random_tensor(module.input_specs[0])
    make = load.caller(target, "tiny", x, binary=True)
    equal = load.check(make, module.infer([x])[0])
    windows = [load.run(target, make, 1, seconds) for _ in range(rounds)]
    cpu = statistics.median(w["server_cpu_us"] for w in windows)
    return {
        "suite": "batching",
        "case": "tiny/onnx, 1 client, server CPU per request",
        "server_cpu_us": cpu,
        "requests_per_s": statistics.median(w["requests_per_s"] for w in windows),
        "p99_ms": statistics.median(w["p99_ms"] for w in windows),
        "outputs_equal": equal,
        "errors": sum(w["errors"] for w in windows),
        "target": f"<= {TARGET_CPU_US:.0f} µs",
        "met": cpu <= TARGET_CPU_US,
    }


def _on_vs_off(target: load.Target, calls: dict, clients: int, rounds: int, seconds: float, equal: bool) -> dict:
    """Interleaved rounds (the order alternates); ratios per round, then their medians."""
    windows: dict[str, list[dict]] = {"mlp": [], "mlp_batched": []}
    batch_sizes = []
    for r in range(rounds):
        order = ["mlp", "mlp_batched"] if r % 2 == 0 else ["mlp_batched", "mlp"]
        for name in order:
            before = _batches(target.port)
            windows[name].append(load.run(target, calls[name], clients, seconds))
            if name == "mlp_batched":
                after = _batches(target.port)
                batch_sizes.append((after[0] - before[0]) / max(after[1] - before[1], 1))
    off, on = windows["mlp"], windows["mlp_batched"]
    speedup = statistics.median(b["requests_per_s"] / a["requests_per_s"] for a, b in zip(off, on))
    p99 = statistics.median(b["p99_ms"] / a["p99_ms"] for a, b in zip(off, on))
    result = {
        "suite": "batching",
        "case": f"mlp/onnx, {clients} client{'s' if clients > 1 else ''}, batching {BATCHING} vs off",
        "off_requests_per_s": statistics.median(w["requests_per_s"] for w in off),
        "on_requests_per_s": statistics.median(w["requests_per_s"] for w in on),
        "speedup": speedup,
        "off_p99_ms": statistics.median(w["p99_ms"] for w in off),
        "on_p99_ms": statistics.median(w["p99_ms"] for w in on),
        "p99_ratio": p99,
        "mean_batch": statistics.median(batch_sizes),
        "off_server_cpu_us": statistics.median(w["server_cpu_us"] for w in off),
        "on_server_cpu_us": statistics.median(w["server_cpu_us"] for w in on),
        "outputs_equal": equal,
        "errors": sum(w["errors"] for w in off + on),
    }
    if clients == 16:
        result["target"] = f"speedup >= {TARGET_SPEEDUP}x, p99 <= {TARGET_P99}x"
        result["met"] = speedup >= TARGET_SPEEDUP and p99 <= TARGET_P99
    return result


def _batches(port: int) -> tuple[float, float]:
    """(rows, runs) of the batched MLP so far, from the server's /metrics."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = dict(re.findall(r'^arachne_batch_size_(sum|count)\{model="mlp_batched"\} (\S+)$', text, re.MULTILINE))
    return float(found.get("sum", 0)), float(found.get("count", 0))
