"""Memory while field samples are delivered: a spool of about 100 MB of MobileNet-sized samples (8 closed
segments of about 12.5 MB; --quick: 2 of about 2 MB) against a real `mlflow server` (sqlite,
--serve-artifacts, one worker) on loopback.

- pulling device: a device server process follows a registered model; once it serves it, the segments
  are moved into its spool (renamed in, all at once) and its follower uploads them. Its RSS before
  (settled, serving the model), its peak during (sampled every 50 ms) and after; the upload's seconds
  (from the move to an empty spool, so up to one follow interval more) and MB/s.
- pushed device: `arachne-mlflow capture pull` drains a plain device server's spool. The command's
  peak RSS with nothing to drain (its imports) and with the spool, and the device's RSS while it
  serves the segments.

Target: memory independent of the spool and of a segment's size (the segments stream from file to
socket, their samples are read one at a time): peak growth under 16 MB; every sample arrives once
(`load_samples`, counted by timestamp).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from arachne_mlflow.protocol.capture_format import Sample, encode_sample, segment_name
from arachne_mlflow.server.capture.manager import CAPTURE_DIR
from benchmarks.servers import device_server, rss_mb
from benchmarks.suites.pull import _register, _server

MODEL = "det"  # the served model whose spool is delivered
T0 = 1_780_000_000.0
SAMPLE_MS = 0.05
TARGET_GROWTH_MB = 16.0  # peak RSS above the settled one (a default segment is at most 16 MiB)


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    segments, megabytes = (2, 2.0) if quick else (8, 12.5)
    with tempfile.TemporaryDirectory(prefix="arachne-bench-capture-upload-") as tmp:
        root = Path(tmp)
        with _server(root / "mlflow") as (url, _):
            registered = _register(url, models["tiny/onnx"]["model_file"])
            return [
                _pulling_device(url, registered, root, segments, megabytes),
                _pushed_device(url, registered, root, segments, megabytes),
            ]


# -- a pulling device ------------------------------------------------------------------------------
def _pulling_device(url: str, registered: str, root: Path, segments: int, megabytes: float) -> dict:
    staged = root / "staged-pulling"
    count, size = _write_segments(staged, "bench-pulling", segments, megabytes)
    extra = ("--follow", f"{MODEL}=models:/{registered}@prod", "--follow-interval", "0.5")
    store = root / "store-pulling"
    with _tracking_env(url), device_server(store, extra) as (port, process, _):
        _until(lambda: _serves(port), 300)
        time.sleep(2.0)  # (settled: the install's own allocations done)
        before = rss_mb(process.pid)
        spool = store / CAPTURE_DIR / MODEL
        with _Peak(process.pid) as peak:
            started = time.perf_counter()
            _move_in(staged, spool)
            _until(lambda: [p.name for p in spool.glob("seg-*")] == [segment_name(segments + 1)], 1800)
            seconds = time.perf_counter() - started
        time.sleep(1.0)
        after = rss_mb(process.pid)
    arrived = _arrived(url, registered, "bench-pulling")
    return _row(
        f"pulling device uploads a {size / 1e6:.0f} MB spool ({segments} segments, {count} samples)",
        {"device_rss_before_mb": before, "device_rss_peak_mb": peak.mb, "device_rss_after_mb": after},
        {"seconds": seconds, "mb_per_s": size / seconds / 1e6},
        count,
        arrived,
        peak.mb - before,
    )


# -- a pushed device, drained by the host -------------------------------------------------------------
def _pushed_device(url: str, registered: str, root: Path, segments: int, megabytes: float) -> dict:
    store = root / "store-pushed"
    with device_server(store) as (port, process, _):
        (store / CAPTURE_DIR / MODEL).mkdir(parents=True)
        (store / CAPTURE_DIR / MODEL / segment_name(segments + 1)).write_bytes(b"")  # (an empty spool)
        idle = _drain(url, registered, port)  # nothing there yet: the command's own footprint
        count, size = _write_segments(store / CAPTURE_DIR / MODEL, "bench-pushed", segments, megabytes)
        time.sleep(1.0)
        before = rss_mb(process.pid)
        with _Peak(process.pid) as device_peak:
            started = time.perf_counter()
            host = _drain(url, registered, port)
            seconds = time.perf_counter() - started
        after = rss_mb(process.pid)
    arrived = _arrived(url, registered, "bench-pushed")
    return _row(
        f"capture pull drains a pushed device's {size / 1e6:.0f} MB spool ({segments} segments, {count} samples)",
        {
            "host_rss_peak_idle_mb": idle,
            "host_rss_peak_mb": host,
            "device_rss_before_mb": before,
            "device_rss_peak_mb": device_peak.mb,
            "device_rss_after_mb": after,
        },
        {"seconds": seconds, "mb_per_s": size / seconds / 1e6},
        count,
        arrived,
        max(host - idle, device_peak.mb - before),
    )


def _drain(url: str, registered: str, port: int) -> float:
    """Run `arachne-mlflow capture pull` on the device; its peak RSS in MB."""
    command = [sys.executable, "-m", "arachne_mlflow.cli", "capture", "pull", "-t", f"127.0.0.1:{port}"]
    command += ["-m", MODEL, "--registered-model", registered]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with _Peak(process.pid) as peak:
        output, _ = process.communicate(timeout=1800)
    if process.returncode != 0:
        raise RuntimeError(f"capture pull failed: {output.decode(errors='replace')[-2000:]}")
    return peak.mb


# -- helpers ----------------------------------------------------------------------------------------
class _Peak:
    """The highest RSS of process `pid`, sampled every 50 ms in a thread while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.mb = pid, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError, RuntimeError):  # (a process that has just exited)
                self.mb = max(self.mb, rss_mb(self.pid))
            if self._done.wait(SAMPLE_MS):
                return


def _write_segments(spool: Path, device: str, segments: int, megabytes: float) -> tuple[int, int]:
    """`segments` closed segments of about `megabytes` MB each and an empty open one; (samples, bytes)."""
    spool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.random((1, 224, 224, 3), dtype=np.float32)
    y = rng.random((1, 1000), dtype=np.float32)
    per_segment = max(1, round(megabytes * 1e6 / (x.nbytes + y.nbytes)))
    count = 0
    for sequence in range(1, segments + 1):
        with open(spool / segment_name(sequence), "wb") as file:
            for _ in range(per_segment):
                x[0, 0, 0, 0] = count
                file.write(encode_sample(Sample(MODEL, "1", device, T0 + count, {"x": x}, {"y": y})))
                count += 1
    (spool / segment_name(segments + 1)).write_bytes(b"")
    size = sum((spool / segment_name(n)).stat().st_size for n in range(1, segments + 1))
    return count, size


def _move_in(staged: Path, spool: Path) -> None:
    """The staged segments renamed into the spool, the open (newest) one first: none is seen half-written."""
    spool.mkdir(parents=True, exist_ok=True)
    for path in sorted(staged.iterdir(), reverse=True):
        path.rename(spool / path.name)


def _arrived(url: str, registered: str, device: str) -> Counter:
    from mlflow import MlflowClient

    from arachne_mlflow.capture import load_samples

    arrays = load_samples(registered, devices=[device], client=MlflowClient(url))
    return Counter(arrays.timestamps.tolist())


def _row(case: str, memory: dict, speed: dict, count: int, arrived: Counter, growth: float) -> dict:
    once = len(arrived) == count and set(arrived.values()) == {1}
    return {
        "suite": "capture upload",
        "case": case,
        **memory,
        **speed,
        "samples_arrived": sum(arrived.values()),
        "each_once": once,
        "load_average": os.getloadavg()[0],
        "target": f"peak RSS growth <= {TARGET_GROWTH_MB:.0f} MB, every sample once",
        "met": once and growth <= TARGET_GROWTH_MB,
    }


@contextlib.contextmanager
def _tracking_env(url: str):
    """The device server (started in the block) inherits the tracking server's URI and no credentials."""
    saved = dict(os.environ)
    os.environ["MLFLOW_TRACKING_URI"] = url
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        os.environ.pop(name, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _serves(port: int) -> bool:
    import requests

    with contextlib.suppress(requests.RequestException):
        return requests.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", timeout=5).status_code == 200
    return False


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not done after {timeout} s")
        time.sleep(0.1)
