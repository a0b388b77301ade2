"""The "simple" runtime plugin: a template for plugging a DNN library of your own into arachne-mlflow.

Each method only logs that it was called. Replace the bodies with calls into your library:
load the model in `__init__`, describe its tensors with `_bind_specs`, and run it in `_infer`.
The base class gives you `set_input` / `run` / `get_output`, input checks and `benchmark()`.

Two ways to register it, both shown here:
- the entry point `simple` in the group `arachne_mlflow.runtimes` (see pyproject.toml), found
  when the package is installed, with no import needed;
- the `@register_runtime("simple")` decorator, which registers it when this module is imported.
"""

from __future__ import annotations

import logging

import numpy as np

from arachne_mlflow.runtime import RuntimeModule, register_runtime

logger = logging.getLogger(__name__)


@register_runtime("simple")
class SimpleRuntimeModule(RuntimeModule):
    """Logs each call; its model has no inputs and one empty output."""

    def __init__(self, model_file: str | None = None, **options):
        logger.info("SimpleRuntimeModule.__init__(model_file=%r, options=%r)", model_file, options)
        self.model_file = model_file
        self._bind_specs(inputs=[], outputs=[])

    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        logger.info("SimpleRuntimeModule.run(%d inputs)", len(inputs))
        return [np.array([])]

    def get_output(self, index_or_name):
        logger.info("SimpleRuntimeModule.get_output(%r)", index_or_name)
        return self._results[0] if self._results else np.array([])

    def _close(self) -> None:
        logger.info("SimpleRuntimeModule.done()")
