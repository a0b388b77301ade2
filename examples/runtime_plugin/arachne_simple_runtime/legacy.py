"""The template written the earlier Arachne Runtime's way, which still loads and runs unchanged.

Its model is a text file holding one number, the factor it multiplies its input by. Unlike
`SimpleRuntimeModule`, it overrides the stateful methods themselves (`set_input`, `run`,
`get_output`, the details, `benchmark`) and binds no specs: arachne-mlflow drives those methods
for `infer()`, the device server and pyfunc, and reads the specs from the details. New plugins
should implement `_infer` instead (see `SimpleRuntimeModule`): they get input checks,
thread-safety and `benchmark()` for free.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from arachne_mlflow.runtime import RuntimeModule

logger = logging.getLogger(__name__)


class ScaleRuntimeModule(RuntimeModule):
    """x[-1, 4] (float32) -> x * factor; registered as `simple-legacy` by an entry point."""

    def __init__(self, model: str, **kwargs):
        logger.info("ScaleRuntimeModule.__init__(model=%r, kwargs=%r)", model, kwargs)
        with open(model) as file:
            self.factor = np.float32(file.read())
        self._input: np.ndarray | None = None
        self._output: np.ndarray | None = None

    def get_input_details(self):
        return [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]

    def get_output_details(self):
        return [{"name": "y", "dtype": "float32", "shape": [-1, 4]}]

    def set_input(self, idx, value):
        self._input = np.asarray(value, dtype=np.float32)

    def run(self):
        self._output = self._input * self.factor

    def get_output(self, idx):
        return self._output

    def benchmark(self, warmup: int = 1, repeat: int = 10, number: int = 1):
        self.set_input(0, np.zeros((1, 4), np.float32))
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self.run()
            times.append((time.perf_counter() - start) * 1000 / number)
        return {"mean": float(np.mean(times)), "std": float(np.std(times)), "max": max(times), "min": min(times)}
