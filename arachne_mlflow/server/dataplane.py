"""The protocol-independent core of the device server: inference and metadata, answered with plain data.

Routes (REST and gRPC) hand messages and names in; the dataplane decodes them with the
protocol's codec, runs blocking work (decoding, inference, loading, extraction) in one thread
pool through `run_blocking`, and returns the protocol's answer or plain dicts. What the store
holds and how that changes (index, upload, rollback, the followers) is its `repository`
(server/repository.py), which runs in the same pool. Models that are
not thread-safe are locked by their own RuntimeModule, so a slow model never holds up another.
A model with batching settings has its requests checked here, then merged with others by its
`Batcher` (server/batching.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import platform
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import numpy as np

from arachne_mlflow import __version__
from arachne_mlflow.errors import ArachneError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from arachne_mlflow.model.arch import machine_arch
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.protocol import codec
from arachne_mlflow.protocol import shared_memory as shm_protocol
from arachne_mlflow.protocol.datatypes import config_datatype, to_datatype
from arachne_mlflow.runtime import RuntimeModule
from arachne_mlflow.runtime.onnx_build import onnxruntime_build
from arachne_mlflow.server.batching import Batcher, BatchingCollector, BatchStats
from arachne_mlflow.server.capture import Capture
from arachne_mlflow.server.classification import add_to_config, answer_outputs
from arachne_mlflow.server.loading import LoadedModel
from arachne_mlflow.server.metrics import Metrics, ModelSeries, RequestTimes, StoreCollector
from arachne_mlflow.server.probe import known_tvm_devices
from arachne_mlflow.server.repository import Repository
from arachne_mlflow.server.settings import ServerSettings
from arachne_mlflow.server.shared_memory import EXTENSIONS as SHARED_MEMORY_EXTENSIONS
from arachne_mlflow.server.shared_memory import SharedMemoryRegistry
from arachne_mlflow.server.store import ModelStore

_logger = logging.getLogger(__name__)
T = TypeVar("T")
#: A protocol's infer codec: its request message -> InferRequest, and (model, outputs, request,
#: version) -> its answer (REST: the V2 JSON/binary codec; gRPC: protocol.grpc.codec).
Decode = Callable[[Any, Sequence[TensorSpec]], codec.InferRequest]  # (message, the model's inputs)
Encode = Callable[[str, dict[str, np.ndarray], codec.InferRequest, str], Any]

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "statistics",
    "arachne_upload",
    "arachne_benchmark",
    "metrics",
]
# Distributions that provide each built-in runtime's library, in the order the backend tries them
# (onnxruntime has several builds: `onnxruntime_build` says which one Python imports).
_LIBRARIES = {
    "tflite": ("ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu"),
    "tvm": ("apache-tvm", "tvm"),
}
_BENCHMARK_LIMITS = {"warmup": (0, 1000), "repeat": (1, 10_000), "number": (1, 1000)}
# A request whose model answers faster than this (recent average) runs on the event loop: two
# thread hand-offs cost more than the inference itself, and block the loop for no longer.
INLINE_SECONDS = 0.001
# ... unless its body is larger than this: decoding it alone would hold up every other connection.
INLINE_MAX_BYTES = 64 * 1024


class Dataplane:
    """Inference and metadata over a `ModelStore`; its `repository` holds the repository operations.

    `settings` give the thread pool's size, the benchmarks' time limit, the batching policy (which
    the store asks at each load: pass the store the same `settings.batching.settings_for`) and
    what pull mode follows.
    """

    def __init__(self, store: ModelStore, settings: ServerSettings | None = None):
        settings = settings or ServerSettings(str(store.root))
        self.store = store
        self.settings = settings
        self.batching_policy = settings.batching
        self.metrics = Metrics()
        self.batch_stats: dict[str, BatchStats] = {}
        self.metrics.registry.register(BatchingCollector(self.batch_stats))
        self.metrics.registry.register(StoreCollector(store))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            settings.max_workers, thread_name_prefix="arachne-dataplane"
        )
        # Benchmarks run one at a time on a thread of their own: they never take the inference pool.
        self._benchmarks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arachne-benchmark")
        self.repository = Repository(store, self.metrics, self.run_blocking, settings.follow, self._forget)
        self.shared_memory = SharedMemoryRegistry(settings.shm_regions, settings.shm_max_bytes)
        # field samples (server/capture/), named by the device name its records use
        self.capture = Capture(
            store.root, self._capture_rules, store.record, device=settings.device_name, shadow_use=store.use
        )
        if settings.follow is not None:  # a pulling device delivers its samples on the follower's loop
            settings.follow.capture = self.capture
        self.metrics.registry.register(self.capture.counts)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The one way blocking work leaves the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    @property
    def ready(self) -> bool:
        """Whether start-up has loaded the stored models (`/v2/health/ready`)."""
        return self.repository.ready

    async def start(self) -> None:
        await self.repository.start()

    async def close(self) -> None:
        await self.repository.close()
        self.shared_memory.close()
        await self.run_blocking(self.capture.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._benchmarks.shutdown(wait=False, cancel_futures=True)

    def _capture_rules(self, name: str) -> Any:
        """The capture rules of the loaded version's MLmodel (None: none, or not loaded)."""
        try:
            return self.store.get(name).capture
        except ArachneError:
            return None

    def _forget(self, name: str) -> None:
        """A deleted model's statistics go with it."""
        self.metrics.forget(name)
        self.batch_stats.pop(name, None)

    # -- metadata --------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "arachne-mlflow",
            "version": __version__,
            "extensions": EXTENSIONS + (SHARED_MEMORY_EXTENSIONS if self.shared_memory.enabled else []),
            "platform": platform.platform(),
            "arch": machine_arch(),
            "python": platform.python_version(),
            "runtimes": available_runtimes(),
            "signatures": self.store.signatures.metadata(),
        }

    def model_metadata(self, name: str) -> dict[str, Any]:
        self.repository.check_installed(name)
        record, inputs, outputs = self.store.spec(name)
        batches = self.batching(name) is not None
        return {
            "name": name,
            "versions": [str(record["revision"])],
            "platform": f"arachne_{record['runtime']}",
            "inputs": [_tensor_metadata(spec, batches) for spec in inputs],
            "outputs": [_tensor_metadata(spec, batches) for spec in outputs],
        }

    def batching(self, name: str) -> Any:
        """The dynamic batcher's settings of a loaded model (`LoadedModel.batching`), None when off."""
        try:
            return self.store.get(name).batching
        except ModelNotReadyError:
            return None

    def model_config(self, name: str) -> dict[str, Any]:
        """Triton's model configuration (`ModelConfig` JSON): what perf_analyzer reads first.

        With dynamic batching on, `max_batch_size` is the batcher's and `dims` leave out the
        batch dimension (the metadata shapes keep it, as -1); otherwise `max_batch_size` is 0,
        `dims` are the whole shapes, and a server-wide `--batching` that skipped the model says why
        in `parameters`.
        """
        record, inputs, outputs = self.store.spec(name)
        batching = self.batching(name)
        skip = 1 if batching is not None else 0

        def tensor(spec: Any) -> dict[str, Any]:
            return {"name": spec.name, "data_type": config_datatype(spec.dtype), "dims": list(spec.shape[skip:])}

        config: dict[str, Any] = {
            "name": name,
            "platform": f"arachne_{record['runtime']}",
            "backend": record["runtime"],
            "max_batch_size": 0,
            "input": [tensor(spec) for spec in inputs],
            "output": [tensor(spec) for spec in outputs],
        }
        if batching is not None:
            config.update(batching.to_config())  # max_batch_size and dynamic_batching
        elif skipped := self.batching_policy.skipped.get(name):
            config["parameters"] = {"arachne.batching": {"string_value": f"--batching does not apply: {skipped}"}}
        return add_to_config(config, self.store, name)

    def statistics(self, name: str | None = None) -> dict[str, Any]:
        """Triton's inference statistics of one model, or of every loaded model."""
        names = [name] if name else [entry["name"] for entry in self.repository.index(ready_only=True)]
        result = []
        for model in names:
            version = str(self.store.record(model)["revision"])
            series = self.metrics.models.get(model) or ModelSeries()
            result.append(series.triton.to_dict(model, version))
        return {"model_stats": result}

    def check_version(self, name: str, version: str) -> None:
        """Only the served version of a model exists (V2 paths may name one)."""
        _check_version(name, version, str(self.store.record(name)["revision"]))

    def model_ready(self, name: str) -> dict[str, Any]:
        self.repository.check_installed(name)
        self.store.get(name)
        return {"name": name, "ready": True}

    # -- inference -------------------------------------------------------------------------
    async def infer(
        self, name: str, body: bytes, header_length: str | bytes | None, version: str | None = None
    ) -> tuple[bytes, int | None]:
        """Run one REST infer request (V2 JSON or binary) on `version` of the model, if given; returns
        the response body and its JSON header length."""
        if shm_protocol.names_region(body, header_length):  # (tensors in shared memory: server/shared_memory.py)
            regions = self.shared_memory.rest_message(body, header_length)
            return await self.infer_message(name, regions, regions.decode, regions.encode, version, regions.size)
        message = (body, header_length)
        return await self.infer_message(name, message, _decode_rest, codec.encode_response, version, len(body))

    async def infer_message(
        self, name: str, message: Any, decode: Decode, encode: Encode, version: str | None = None, size: int = 0
    ) -> Any:
        """Run one infer request of any protocol: `decode` makes an InferRequest of `message` for the
        model's inputs (checking each tensor against them before decoding its data), `encode` the
        protocol's answer of the outputs. `version` is checked on the model the request runs on (a
        replace may have come since the request arrived); `size` is the message's, in bytes.

        Batched models go through their batcher; of the rest, small requests to fast models run
        inline on the event loop, others in the thread pool.
        """
        times = RequestTimes(time.perf_counter_ns())
        series = self.metrics.models.get(name)
        if series is None:
            self.repository.check_installed(name)
            self.store.get(name)  # unknown or unloaded models fail here, before they have a series
            series = self.metrics.models.setdefault(name, ModelSeries())
        loaded = None
        try:
            loaded = self.store.acquire(name)
            if version is not None:  # checked on the model taken: a replace may have come since the request
                _check_version(name, version, loaded.revision)
            if loaded.batching is not None:
                response = await self._infer_batched(name, loaded, message, decode, encode, times, size)
            elif series.recent_seconds < INLINE_SECONDS and size <= INLINE_MAX_BYTES:
                response = self._infer(name, loaded, message, decode, encode, times)
            else:
                response = await self.run_blocking(self._infer, name, loaded, message, decode, encode, times)
        except Exception:
            series.failed(times)
            raise
        finally:
            if loaded is not None:
                loaded.release()
        series.succeeded(times, executed=loaded.batching is None)  # (the batcher records its executions)
        return response

    def _infer(
        self, name: str, loaded: LoadedModel, message: Any, decode: Decode, encode: Encode, times: RequestTimes
    ) -> Any:
        started = time.perf_counter_ns()
        times.queue = started - times.arrived
        request = decode(message, loaded.module.input_specs)
        inputs = _ordered_inputs(loaded.input_names, request.inputs)
        decoded = time.perf_counter_ns()
        outputs = loaded.module.infer(inputs)
        ran = time.perf_counter_ns()
        answer = dict(zip(loaded.output_names, outputs))
        response = encode(name, answer_outputs(loaded, answer, request), request, loaded.revision)
        times.compute_input = decoded - started
        times.compute_infer = ran - decoded
        times.compute_output = time.perf_counter_ns() - ran
        self.capture.offer(name, loaded.revision, loaded.capture, request.inputs, answer)
        return response

    async def _infer_batched(
        self,
        name: str,
        loaded: LoadedModel,
        message: Any,
        decode: Decode,
        encode: Encode,
        times: RequestTimes,
        size: int,
    ) -> Any:
        """Decode and check on the event loop (a bad request is refused before it joins a batch), then
        wait for the batch. Batches run in the thread pool: while one runs, the loop takes in the next."""
        started = time.perf_counter_ns()
        if size <= INLINE_MAX_BYTES:
            request = decode(message, loaded.module.input_specs)
        else:  # (off the event loop, as for a model that does not batch)
            request = await self.run_blocking(decode, message, loaded.module.input_specs)
        ordered = _ordered_inputs(loaded.input_names, request.inputs)
        inputs = [spec.check(value) for spec, value in zip(loaded.module.input_specs, ordered)]
        times.compute_input = time.perf_counter_ns() - started
        times.samples = inputs[0].shape[0] if inputs and inputs[0].ndim else 1
        batcher = loaded.batcher
        if batcher is None:
            stats = self.batch_stats.setdefault(name, BatchStats())
            run = functools.partial(self.run_blocking, loaded.module.infer)
            triton = self.metrics.models[name].triton
            batcher = loaded.batcher = Batcher(
                loaded.batching,  # type: ignore[arg-type]
                run,
                stats,
                executed=lambda rows, infer_ns: triton.executed(rows, 0, infer_ns, 0),
                name=name,
            )
        outputs = await batcher.submit(inputs, times)
        encoding = time.perf_counter_ns()
        answer = dict(zip(loaded.output_names, outputs))
        response = encode(name, answer_outputs(loaded, answer, request), request, loaded.revision)
        times.compute_output = time.perf_counter_ns() - encoding
        self.capture.offer(name, loaded.revision, loaded.capture, request.inputs, answer)
        return response

    async def benchmark(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Time the model on the server with `RuntimeModule.benchmark`: bounded repeat counts, at most
        `benchmark_seconds`, one at a time; cancelling the call (the client hung up) stops it."""
        kwargs = {}
        for key, value in options.items():
            if key not in _BENCHMARK_LIMITS:
                raise InvalidInputError(f"unknown benchmark option {key!r}; options: {sorted(_BENCHMARK_LIMITS)}")
            low, high = _BENCHMARK_LIMITS[key]
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidInputError(f"benchmark option {key!r} must be an integer in [{low}, {high}]")
            kwargs[key] = value
        self.store.get(name)  # unknown or unloaded models fail here, before a thread is taken
        stop = threading.Event()

        def run() -> dict[str, Any]:
            with self.store.use(name) as loaded:
                module = loaded.module
                if type(module).benchmark is not RuntimeModule.benchmark:  # a plugin's own: bounded by the counts
                    return module.benchmark(**kwargs)
                return module.benchmark(**kwargs, max_seconds=self.settings.benchmark_seconds, stop=stop)

        try:
            result = await asyncio.get_running_loop().run_in_executor(self._benchmarks, run)
        except asyncio.CancelledError:
            stop.set()  # one that has not started is dropped; a running one ends after its current repeat
            raise
        return {"name": name, **result}


def _ordered_inputs(names: list[str], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The request's arrays in the model's input order; every input named once, no others."""
    if len(inputs) == len(names):
        try:
            return [inputs[n] for n in names]
        except KeyError:
            pass
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    raise InvalidInputError(f"the model's inputs are {names}; missing {missing}, unknown {unknown}")


def _check_version(name: str, version: str, served: str) -> None:
    if version != served:
        raise ModelNotFoundError(f"model {name!r} has no version {version!r}; the served version is {served}")


def _decode_rest(message: tuple[bytes, str | bytes | None], inputs: Sequence[TensorSpec]) -> codec.InferRequest:
    return codec.decode_request(*message, inputs)


def _tensor_metadata(spec: Any, batches: bool = False) -> dict[str, Any]:
    shape = list(spec.shape)
    if batches and shape:
        shape[0] = -1  # Triton's metadata of a batching model: the batch dimension first, as -1
    return {"name": spec.name, "datatype": to_datatype(spec.dtype), "shape": shape}


def available_runtimes() -> list[dict[str, Any]]:
    """Runtimes this server can load, with the library and version that provides each (and TVM's devices,
    onnxruntime's providers).

    Nothing here imports a DNN library into the server: TVM's devices are the ones the last child
    process that imported TVM found (`probe.py`: a model's probe, or the listing at start-up), and
    `None` while none has; onnxruntime's providers come from a child too until a model loads it.
    """
    from arachne_mlflow.runtime import list_runtimes

    result = []
    for name in list_runtimes():
        if name == "onnx":
            build = onnxruntime_build()
            if build is not None:
                result.append({"name": name, **build})
            continue
        if name not in _LIBRARIES:
            result.append({"name": name, "library": None, "version": None})
            continue
        for distribution in _LIBRARIES[name]:
            try:
                result.append({"name": name, "library": distribution, "version": version(distribution)})
                break
            except PackageNotFoundError:
                continue
    for entry in result:
        if entry["name"] == "tvm":
            devices = known_tvm_devices()
            entry["devices"] = None if devices is None else list(devices)
    return result
