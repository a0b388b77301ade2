"""Closed-loop load on an inference server: N client threads, each sending its next request when the
last one is answered, for a fixed time. Open Inference Protocol servers get tritonclient (binary
tensors or JSON), `mlflow models serve` its own JSON through `requests`.

Besides requests/s and latency percentiles, a window reports the server's CPU time per request:
user + system time of the server process and its children (MLServer's workers), from /proc.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """One server and how to ask it: `kind` is "v2" (tritonclient) or "mlflow" (/invocations)."""

    name: str
    port: int
    pid: int
    kind: str = "v2"


class Refused(Exception):
    """The server answers this kind of request with an error (a cell the table reports as refused)."""


def process_tree_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) used by `pid` and its live descendants."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += cpu.get(current, 0.0)
        stack += children.get(current, [])
    return total


def caller(target: Target, model: str, x: np.ndarray, binary: bool) -> Callable[[], Callable[[], np.ndarray]]:
    """A factory of per-thread callers (each with its own connection) that send `x` and return the output."""
    if target.kind == "mlflow":
        return _mlflow_caller(target, x)
    import tritonclient.http as httpclient

    def make() -> Callable[[], np.ndarray]:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{target.port}", network_timeout=120)
        request = httpclient.InferInput("x", list(x.shape), "FP32")
        request.set_data_from_numpy(x, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("y", binary_data=binary)]

        def call() -> np.ndarray:
            return client.infer(model, [request], outputs=wanted).as_numpy("y")

        return call

    return make


def _mlflow_caller(target: Target, x: np.ndarray) -> Callable[[], Callable[[], np.ndarray]]:
    import json

    import requests

    body = json.dumps({"inputs": x.tolist()})
    url = f"http://127.0.0.1:{target.port}/invocations"

    def make() -> Callable[[], np.ndarray]:
        session = requests.Session()

        def call() -> np.ndarray:
            response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            response.raise_for_status()
            predictions = response.json()["predictions"]
            if isinstance(predictions, dict):  # MLflow's ONNX pyfunc answers {output name: values}
                [predictions] = predictions.values()
            return np.asarray(predictions, dtype=np.float32)

        return call

    return make


def check(make: Callable[[], Callable[[], np.ndarray]], expected: np.ndarray) -> bool:
    """One request: raises `Refused` with the server's answer if it refuses; True if the output is bit-equal."""
    try:
        got = make()()
    except Exception as err:  # tritonclient's and requests' errors alike: the cell is refused
        raise Refused(f"{type(err).__name__}: {str(err)[:160]}") from err
    return got.shape == expected.shape and np.array_equal(got, expected)


def run(target: Target, make: Callable[[], Callable[[], np.ndarray]], clients: int, seconds: float) -> dict:
    """`clients` threads for `seconds`; requests/s, p50/p99 latency (ms), server CPU µs per request."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_line = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        call = make()
        call()  # connect and warm up outside the timed window
        start_line.wait()
        mine = latencies[i]
        while time.perf_counter() < stop_at[0]:
            begin = time.perf_counter()
            try:
                call()
            except Exception as err:  # noqa: BLE001 (counted and reported: the target is zero)
                errors.append(repr(err)[:200])
            mine.append(time.perf_counter() - begin)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 3600
    start_line.wait()
    cpu_before, began = process_tree_cpu(target.pid), time.perf_counter()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu = process_tree_cpu(target.pid) - cpu_before
    flat = np.array([v for per in latencies for v in per])
    return {
        "requests": int(flat.size),
        "requests_per_s": flat.size / elapsed,
        "p50_ms": float(np.percentile(flat, 50) * 1e3),
        "p99_ms": float(np.percentile(flat, 99) * 1e3),
        "server_cpu_us": cpu / max(flat.size, 1) * 1e6,
        "errors": len(errors),
    }
