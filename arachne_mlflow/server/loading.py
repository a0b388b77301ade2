"""Loading a stored version into the server, and the loaded module it serves from.

A version is loaded here only once a child process has loaded it (probe.py; for an upload, once it
has also answered its smoke inference there), unless the same files, as they are on disk now, loaded
here before: the digest that says so covers every file and symbolic link (model/digest.py
`tree_digest`) and is computed again before each load, so files changed on disk since they loaded
are probed again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arachne_mlflow import runtime
from arachne_mlflow.errors import ArachneError, InvalidInputError
from arachne_mlflow.model.digest import tree_digest
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.runtime import RuntimeModule
from arachne_mlflow.server.probe import probe_load

if TYPE_CHECKING:
    from arachne_mlflow.model.capture_rules import CaptureRules
    from arachne_mlflow.server.batching import Batcher, BatchingSettings

#: What serving makes of a model as it loads (its batching settings, None: none), from its name, its
#: MLmodel `arachne.batching` block and the loaded module's input and output specs; raises to refuse it.
ServingCheck = Callable[[str, Any, Sequence[TensorSpec], Sequence[TensorSpec]], Any]

# Digests of loaded versions remembered so that they load without a child next time (a bound, not a cache size).
MAX_PROVEN = 1024


class LoadedModel:
    """A loaded runtime module that is freed only when the last inference using it has finished.

    `batching` is how serving batches its requests (None: each runs alone: the store's `ServingCheck`
    said so at the load); the dataplane makes its `batcher` when the first request comes.
    """

    def __init__(
        self,
        module: RuntimeModule,
        record: dict[str, Any],
        load_seconds: float,
        batching: BatchingSettings | None = None,
    ):
        self.module = module
        self.record = record
        self.load_seconds = load_seconds
        self.batching = batching
        self.batcher: Batcher | None = None
        self.capture: CaptureRules | None = None  # its MLmodel's capture rules (server/capture/)
        self.revision = str(record["revision"])
        self.input_names = [spec.name for spec in module.input_specs]
        self.output_names = [spec.name for spec in module.output_specs]
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        """Hold the module for one use; False once it is retired (look the model up again)."""
        with self._lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            free = self._retired and self._users == 0
        if free:
            self.module.done()

    def retire(self) -> None:
        """Free the module now, or after the inferences still running on it finish."""
        with self._lock:
            self._retired = True
            free = self._users == 0
        if free:
            self.module.done()


class Loader:
    """Loads versions in this process, each once a child has (see above); `serving` is the serving
    side's say on each model as it loads; `stopping` ends the probes of a store that closes."""

    def __init__(self, serving: ServingCheck, stopping: threading.Event):
        self._serving = serving
        self._stopping = stopping
        self._guard = threading.Lock()
        # digests of versions that loaded in this process, oldest first: whether they answered a smoke inference
        self._proven: dict[str, bool] = {}

    def load_proven(
        self,
        model: ArachneModel,
        record: dict[str, Any],
        consequence: str,
        trusted: bool = True,
        digest: str = "",
        smoke: bool = False,
    ) -> LoadedModel:
        """Load `model` here, once a child has loaded it (unless, `trusted`, the same files, as they
        are on disk now, loaded here before); with `smoke` (uploads), once it has also answered its
        smoke inference there. `digest`: of its files, when it was just computed."""
        digest = digest or tree_digest(model.path)
        if not trusted or self._proven.get(digest) is not True and (smoke or digest not in self._proven):
            probe_load(model, record["name"], consequence, stop=self._stopping, smoke=smoke)
        return self.load(model, record, digest, smoke)

    def load(
        self, model: ArachneModel, record: dict[str, Any], digest_before: str = "", smoked: bool = False
    ) -> LoadedModel:
        """Load `model` in this process and remember its files' digest as proven: `digest_before` (the
        files a child loaded), else the files as they are now. (No backend writes into a model's
        directory: TVM links a `.tar` library elsewhere, runtime/tvm.py.)"""
        digest = digest_before or tree_digest(model.path)
        start = time.perf_counter()
        try:
            module = runtime.load(model)
        except ArachneError:
            raise
        except Exception as err:  # a DNN library's own error for a corrupt or foreign model file
            raise InvalidInputError(f"model {record['name']!r} cannot be loaded: {err}") from err
        try:
            batching = self._serving(record["name"], model.batching, module.input_specs, module.output_specs)
        except ArachneError:
            module.done()
            raise
        with self._guard:
            self._proven[digest] = self._proven.pop(digest, False) or smoked
            while len(self._proven) > MAX_PROVEN:
                del self._proven[next(iter(self._proven))]
        loaded = LoadedModel(module, record, time.perf_counter() - start, batching)
        loaded.capture = model.capture
        return loaded


def read_checked(path: Path) -> ArachneModel:
    """The model at `path`, refused (400, naming the key) if its runtime options are not ones its
    backend lets an uploaded model set, or if this machine cannot run it."""
    model = read_model_dir(path)
    runtime.get_runtime_class(model.runtime).check_server_options(model.runtime_options)
    model.check_compatible()
    return model
