"""Throughput of one device server under 1, 4 and 16 concurrent clients (threads, one client each).

Reports requests/s and p50/p99 latency; every request must succeed. Client threads share this
process's GIL, so on a small machine the figures are a floor for what separate clients reach.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.runtime import random_tensor
from arachne_mlflow.runtime.onnx import ONNXRuntimeModule
from benchmarks.servers import device_server


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import onnx as arachne_onnx

    rows = []
    seconds = 1.0 if quick else 5.0
    with tempfile.TemporaryDirectory() as tmp, device_server(Path(tmp) / "store") as (port, _, _):
        for model in ("tiny", "mobilenet"):
            onnx_file = models[f"{model}/onnx"]["model_file"]
            model_dir = Path(tmp) / model
            arachne_onnx.save_model(onnx_file, str(model_dir))
            with DeviceClient("127.0.0.1", port) as client:
                client.upload_model(model, model_dir)
            x = random_tensor(ONNXRuntimeModule(onnx_file).input_specs[0])
            for clients in (1, 4, 16):
                rows.append(_load(port, model, x, clients, seconds))
    return rows


def _load(port: int, model: str, x: np.ndarray, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_line = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        with DeviceClient("127.0.0.1", port) as client:
            client.infer(model, [x])  # connect and warm up outside the timed window
            start_line.wait()
            while time.perf_counter() < stop_at[0]:
                begin = time.perf_counter()
                try:
                    client.infer(model, [x])
                except Exception as err:  # noqa: BLE001 (counted and reported: the target is zero)
                    errors.append(repr(err))
                latencies[i].append(time.perf_counter() - begin)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 0.05
    start_line.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    flat = np.array([v for per in latencies for v in per])
    return {
        "suite": "throughput",
        "case": f"{model}/onnx, {clients} clients",
        "requests": int(flat.size),
        "requests_per_s": flat.size / elapsed,
        "p50_ms": float(np.percentile(flat, 50) * 1e3),
        "p99_ms": float(np.percentile(flat, 99) * 1e3),
        "errors": len(errors),
        "target": "no errors",
        "met": not errors,
    }
