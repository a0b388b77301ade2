"""Pushing a 100 MB model to a device server: MB/s, and the server's peak memory growth meanwhile.

The model is a TFLite file with one 100 MB dense layer, loaded without XNNPACK (its weights stay
in the memory-mapped file), so the server's memory growth measures how the upload is handled:
streamed to disk, it stays small (target <= 64 MB); buffered, it would be >= 100 MB.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from arachne_mlflow.client import DeviceClient
from benchmarks.models import CACHE, _tf, _write
from benchmarks.servers import device_server, rss_mb

TARGET_GROWTH_MB = 64


def big_tflite(path: Path) -> Path:
    if not path.exists():
        tf = _tf()
        inputs = tf.keras.Input(shape=(5120,), batch_size=1)
        model = tf.keras.Model(inputs, tf.keras.layers.Dense(5120)(inputs))
        _write(path, tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import tflite as arachne_tflite

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "big"
        arachne_tflite.save_model(
            str(big_tflite(CACHE / "big_100mb.tflite")),
            str(model_dir),
            runtime_options={"experimental_op_resolver_type": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"},
        )
        size_mb = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 1e6
        with device_server(Path(tmp) / "store") as (port, process, _):
            with DeviceClient("127.0.0.1", port, upload_timeout=600) as client:
                client.server_metadata()
                for attempt in range(1 if quick else 3):
                    before = rss_mb(process.pid)
                    peak = [before]
                    done = threading.Event()

                    def sample() -> None:
                        while not done.is_set():
                            peak[0] = max(peak[0], rss_mb(process.pid))
                            time.sleep(0.005)

                    sampler = threading.Thread(target=sample)
                    sampler.start()
                    start = time.perf_counter()
                    client.upload_model("big", model_dir, force=True)
                    seconds = time.perf_counter() - start
                    done.set()
                    sampler.join()
                    growth = peak[0] - before
                    rows.append(
                        {
                            "suite": "deploy",
                            "case": f"push {size_mb:.0f} MB model (replace #{attempt + 1})",
                            "seconds": seconds,
                            "mb_per_s": size_mb / seconds,
                            "server_rss_before_mb": before,
                            "server_peak_growth_mb": growth,
                            "target": f"peak growth <= {TARGET_GROWTH_MB} MB",
                            "met": growth <= TARGET_GROWTH_MB,
                        }
                    )
    return rows
