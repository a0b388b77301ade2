"""Runtime plugins written the earlier Arachne Runtime's way load unchanged, whatever their `__init__` takes.

The classes below copy the shape of that project's own example (`plugin_examples/simple/simple_runtime.py`):
methods that print that they ran, details that are empty lists, a `benchmark` that returns nothing. Its
`init` passed the model file as the keyword `model=`, so such a plugin may take it as `model`, only through
`**kwargs`, or (written for arachne-mlflow) as its first positional argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.runtime import RuntimeModule, register_runtime


class _EarlierSimple(RuntimeModule):
    """The earlier example's methods, verbatim in shape; each subclass adds one `__init__` shape."""

    def run(self):
        print("LOG: run at SimpleRuntimeModule")

    def set_input(self, idx, value, **kwargs):
        print("LOG: set_input at SimpleRuntimeModule")

    def get_output(self, idx):
        print("LOG: get_output at SimpleRuntimeModule")
        return np.array([])

    def get_input_details(self):
        print("LOG: get_input_details at SimpleRuntimeModule")
        return []

    def get_output_details(self):
        print("LOG: get_output_details at SimpleRuntimeModule")
        return []

    def benchmark(self, warmup: int = 1, repeat: int = 10, number: int = 1):
        print("LOG: benchmark at SimpleRuntimeModule")
        return


@register_runtime("test-earlier-kwargs")
class KwargsOnly(_EarlierSimple):
    def __init__(self, **kwargs):
        print("LOG: __init__ at SimpleRuntimeModule")
        self.received = kwargs


@register_runtime("test-earlier-model")
class ModelKeyword(_EarlierSimple):
    def __init__(self, model, **kwargs):
        print("LOG: __init__ at SimpleRuntimeModule")
        self.received = {"model": model, **kwargs}


@register_runtime("test-earlier-positional")
class Positional(_EarlierSimple):
    def __init__(self, model_path, **kwargs):
        print("LOG: __init__ at SimpleRuntimeModule")
        self.received = {"model": model_path, **kwargs}


@pytest.mark.parametrize("name", ["test-earlier-kwargs", "test-earlier-model", "test-earlier-positional"])
def test_an_earlier_plugin_loads_and_runs_whatever_its_init_takes(name, tmp_path, capsys):
    model = tmp_path / "dummy_model.txt"
    model.write_text("dummy")
    with arachne_runtime.init(runtime=name, model_file=str(model), num_threads=2) as m:
        assert m.received == {"model": str(model), "num_threads": 2}
        m.set_input(0, np.zeros((1, 4), np.float32))
        m.run()
        assert m.get_output(0).size == 0
        assert m.get_input_details() == [] and m.get_output_details() == []
        assert m.benchmark() is None
        assert m.infer([]) == []  # the base drives the plugin's own methods
    printed = capsys.readouterr().out.splitlines()
    assert printed[:4] == [
        "LOG: __init__ at SimpleRuntimeModule",
        "LOG: set_input at SimpleRuntimeModule",
        "LOG: run at SimpleRuntimeModule",
        "LOG: get_output at SimpleRuntimeModule",
    ]


def test_a_plugin_that_wraps_a_builtin_backend_still_gets_the_model_positionally(onnx_linear_file, rng):
    """`*args, **kwargs` forward to the backend's own `__init__(model_file, ...)`: not the keyword `model`."""
    onnx_class = arachne_runtime.get_runtime_class("onnx")

    @register_runtime("test-wrapped-onnx")
    class Wrapped(onnx_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    x = rng.standard_normal((1, 4)).astype(np.float32)
    with arachne_runtime.init("test-wrapped-onnx", model_file=str(onnx_linear_file)) as wrapped:
        with arachne_runtime.init("onnx", model_file=str(onnx_linear_file)) as plain:
            np.testing.assert_array_equal(wrapped.infer([x])[0], plain.infer([x])[0])
