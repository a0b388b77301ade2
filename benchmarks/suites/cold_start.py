"""Cold start: importing the package, loading a TFLite model through pyfunc, a device server ready.

Each is a fresh interpreter, timed from the outside, median of several runs; loading a TFLite
pyfunc model must not import TensorFlow (LiteRT is the runtime).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.servers import device_server

_PYFUNC = """
import sys, time, numpy as np
start = time.perf_counter()
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(np.zeros((1, 16), np.float32))
print(time.perf_counter() - start, "tensorflow" in sys.modules)
"""


def _python(code: str, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from arachne_mlflow.flavors import tflite as arachne_tflite

    repeat = 2 if quick else 5
    rows = []
    bare = statistics.median(_python("pass")[0] for _ in range(repeat))
    ours = statistics.median(_python("import arachne_mlflow.runtime")[0] for _ in range(repeat))
    rows.append(
        {
            "suite": "cold start",
            "case": "import arachne_mlflow.runtime",
            "seconds": ours - bare,
            "python_startup_s": bare,
            "target": None,
            "met": None,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny_tflite"
        arachne_tflite.save_model(models["tiny/tflite"]["model_file"], str(model_dir))
        results = [_python(_PYFUNC, str(model_dir))[1].split() for _ in range(repeat)]
        seconds = statistics.median(float(r[0]) for r in results)
        imported_tf = any(r[1] == "True" for r in results)
        rows.append(
            {
                "suite": "cold start",
                "case": "load + predict a TFLite pyfunc model (mlflow import included)",
                "seconds": seconds,
                "imported_tensorflow": imported_tf,
                "target": "TensorFlow not imported",
                "met": not imported_tf,
            }
        )
        ready = []
        for i in range(repeat):
            with device_server(Path(tmp) / f"store{i}") as (_, _, seconds_to_ready):
                ready.append(seconds_to_ready)
        rows.append(
            {
                "suite": "cold start",
                "case": "device server ready (empty store)",
                "seconds": statistics.median(ready),
                "target": None,
                "met": None,
            }
        )
    return rows
