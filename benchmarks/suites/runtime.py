"""Runtime API (set_input / run / get_output) against a direct call of each raw library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from arachne_mlflow import runtime
from arachne_mlflow.runtime import random_tensor
from benchmarks.timing import interleaved, row

# Target per model: MobileNetV2 as a ratio, the tiny model as µs of overhead per call.
TARGET_RATIO = 1.01
TARGET_OVERHEAD_US = 3.0


def raw_call(kwargs: dict[str, Any], x: np.ndarray) -> Callable[[], Any]:
    """The same inference written against the library directly, as a user without us would."""
    name = kwargs["runtime"]
    if name == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(kwargs["model_file"], providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        out = [session.get_outputs()[0].name]
        return lambda: session.run(out, feed)[0]
    if name == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=kwargs["model_file"])
        interpreter.allocate_tensors()
        i = interpreter.get_input_details()[0]["index"]
        o = interpreter.get_output_details()[0]["index"]

        def tflite_call():
            interpreter.set_tensor(i, x)
            interpreter.invoke()
            return interpreter.get_tensor(o)

        return tflite_call
    if name == "tvm":
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(kwargs["model_file"]), tvm.cpu())
        main = vm["main"]
        device = tvm.cpu()
        return lambda: main(tvm.runtime.tensor(x, device)).numpy()
    raise ValueError(name)


def arachne_call(module: runtime.RuntimeModule, x: np.ndarray) -> Callable[[], Any]:
    def call():
        module.set_input(0, x)
        module.run()
        return module.get_output(0)

    return call


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    rows = []
    for key, kwargs in models.items():
        model, backend = key.split("/")
        module = runtime.init(**kwargs)
        x = random_tensor(module.input_specs[0])
        raw = raw_call(kwargs, x)
        ours = arachne_call(module, x)
        np.testing.assert_equal(raw(), ours())
        tiny = model == "tiny"
        slow = backend == "tvm" and not tiny
        rounds = 5 if quick else (15 if slow else 40)
        number = 2 if quick else (1 if slow else (2000 if tiny else 20))
        series = interleaved({f"raw {backend}": raw, f"arachne {backend}": ours}, rounds=rounds, number=number)
        base, cand = series[f"raw {backend}"], series[f"arachne {backend}"]
        result = row("runtime", key, base, cand)
        if tiny:
            result["target"] = f"overhead <= {TARGET_OVERHEAD_US} µs"
            result["met"] = result["overhead_us_median"] <= TARGET_OVERHEAD_US
        else:
            result["target"] = f"ratio <= {TARGET_RATIO}"
            result["met"] = result["ratio_median"] <= TARGET_RATIO
        rows.append(result)
        module.done()
    return rows
