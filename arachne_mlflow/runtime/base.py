"""The `RuntimeModule` every backend subclasses: input checks, the stateful API, benchmark.

A backend implements `_infer(inputs) -> outputs` (a pure call on a list of checked arrays) and
sets `input_specs` / `output_specs`. Everything else (index and name lookup, dtype and shape
checks, `run()` before inputs are set, thread-safety for backends that need a lock) lives here,
once, so the three DNN libraries behave the same to a caller.

A plugin written the earlier Arachne Runtime's way overrides the stateful methods (`set_input`,
`run`, `get_output`, the details, `benchmark`) instead, and never binds specs: it loads and runs
unchanged. Its `_infer` drives those methods, its specs come from its details, and it is
serialized (its state lives in the instance).
"""

from __future__ import annotations

import abc
import math
import statistics
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.spec import TensorSpec


class RuntimeModule(abc.ABC):
    """A loaded model with the Arachne Runtime API (`set_input` / `run` / `get_output`)."""

    #: Set by the registry: the name this backend was registered under.
    runtime_name: str = ""
    #: False when the library's session must not run two inferences at once (a lock is taken).
    thread_safe: bool = True
    #: The `runtime_options` a model uploaded to a device server may set, each with the type(s) of
    #: its value: an allow-list, so a backend (or plugin) that lists none loads uploads without options.
    server_options: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}

    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._infer is RuntimeModule._infer and all(
            getattr(cls, name) is not getattr(RuntimeModule, name) for name in _STATEFUL_METHODS
        ):  # the earlier Arachne Runtime's way (before ABCMeta counts `_infer` as missing)
            cls._infer = RuntimeModule._drive_stateful_methods
            if "thread_safe" not in vars(cls):
                cls.thread_safe = False

    def __getattr__(self, name: str) -> Any:
        """Specs of a plugin that never bound any (the earlier way): from its own details, once."""
        stateful = type(self)._infer is RuntimeModule._drive_stateful_methods
        if stateful and name in ("input_specs", "output_specs") and "_input_positions" not in vars(self):
            self._bind_specs(
                [TensorSpec.from_dict(d) for d in self.get_input_details()],
                [TensorSpec.from_dict(d) for d in self.get_output_details()],
            )
            return vars(self)[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _bind_specs(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Record the tensor specs; backends call this once they have loaded the model."""
        self.input_specs = list(inputs)
        self.output_specs = list(outputs)
        self._input_positions = _positions(self.input_specs)
        self._output_positions = _positions(self.output_specs)
        self._feed: list[Any] = [None] * len(self.input_specs)
        self._unset = set(range(len(self.input_specs)))
        self._results: list[np.ndarray] | None = None
        self._lock = None if self.thread_safe else threading.Lock()

    @classmethod
    def check_server_options(cls, options: Mapping[str, Any], where: str = "runtime_options") -> None:
        """Refuse, naming the key, any option an uploaded model may not set on a device server.

        Options reach the DNN library as they are: one that names a file, a connection or another
        backend's setting would let an upload reach outside the model store. A backend whose
        options nest (onnxruntime's session and provider options) checks the nested keys too.
        """
        for key, value in options.items():
            kinds = cls.server_options.get(key)
            if kinds is None:
                owner = f"the {cls.runtime_name or cls.__name__} runtime"
                raise refused_option(f"{where}.{key}", owner, cls.server_options)
            check_option_type(f"{where}.{key}", value, kinds)

    # -- what a backend implements -------------------------------------------------------
    @abc.abstractmethod
    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model on checked inputs (in input order); return a list of outputs in order.

        This is the hot path: do per-model work at load, not here.
        """

    def _close(self) -> None:
        """Release the library's resources (sessions, temporary files)."""

    def _drive_stateful_methods(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """`_infer` of a plugin that overrides `set_input` / `run` / `get_output` instead."""
        for index, value in enumerate(inputs):
            self.set_input(index, value)
        self.run()
        return [self.get_output(index) for index in range(len(self.output_specs))]

    # -- the Arachne Runtime API ---------------------------------------------------------
    def get_input_details(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.input_specs]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [spec.to_dict() for spec in self.output_specs]

    def set_input(self, index_or_name: int | str, value: Any) -> None:
        try:
            position = self._input_positions[index_or_name]
        except (KeyError, TypeError):
            raise self._unknown(index_or_name, self.input_specs, "input") from None
        self._feed[position] = self.input_specs[position].check(value)
        if self._unset:
            self._unset.discard(position)

    def run(self) -> None:
        if self._unset:
            missing = [self.input_specs[i].name for i in sorted(self._unset)]
            raise InvalidInputError(f"run() before every input is set: missing {missing}")
        if self._lock is None:
            self._results = self._infer(self._feed)
        else:
            with self._lock:
                self._results = self._infer(self._feed)

    def get_output(self, index_or_name: int | str) -> np.ndarray:
        try:
            return self._results[self._output_positions[index_or_name]]  # type: ignore[index]
        except (KeyError, TypeError):
            pass
        if index_or_name in self._output_positions:
            raise InvalidInputError("get_output() before run(): call run() first")
        raise self._unknown(index_or_name, self.output_specs, "output")

    def infer(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray]:
        """Check `inputs` (one per model input, in order, or a dict by input name) and return every
        output; thread-safe."""
        if isinstance(inputs, Mapping):
            inputs = self._by_name(inputs)
        if len(inputs) != len(self.input_specs):
            raise InvalidInputError(
                f"expected {len(self.input_specs)} inputs {[s.name for s in self.input_specs]}, got {len(inputs)}"
            )
        return self._call([spec.check(v) for spec, v in zip(self.input_specs, inputs)])

    def benchmark(
        self,
        warmup: int = 1,
        repeat: int = 10,
        number: int = 1,
        *,
        max_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> dict[str, float]:
        """Time inference on random inputs made from the input details; milliseconds per run.

        After `max_seconds`, or once `stop` is set, it ends after the repeat in progress (at least
        one runs) and reports the repeats done.
        """
        if repeat < 1 or number < 1 or warmup < 0:
            raise InvalidInputError("benchmark needs repeat >= 1, number >= 1 and warmup >= 0")
        inputs = [random_tensor(spec) for spec in self.input_specs]
        checked = [spec.check(v) for spec, v in zip(self.input_specs, inputs)]
        deadline = math.inf if max_seconds is None else time.perf_counter() + max_seconds

        def over() -> bool:
            return time.perf_counter() > deadline or (stop is not None and stop.is_set())

        for _ in range(warmup):
            if over():
                break
            self._call(checked)
        times: list[float] = []
        for _ in range(repeat):
            if times and over():
                break
            start = time.perf_counter()
            for _ in range(number):
                self._call(checked)
            times.append((time.perf_counter() - start) * 1000.0 / number)
        return {
            "mean": statistics.fmean(times),
            "median": statistics.median(times),
            "p90": _percentile(times, 90),
            "p99": _percentile(times, 99),
            "std": statistics.pstdev(times),
            "max": max(times),
            "min": min(times),
            "repeat": len(times),
            "number": number,
        }

    def done(self) -> None:
        """Free the model; the module cannot run afterwards."""
        self._results = None
        self._close()
        for finalizer in getattr(self, "_finalizers", ()):
            finalizer()

    def _on_done(self, fn: Any, *args: Any) -> None:
        """Call `fn(*args)` at `done()`, or when the module is garbage-collected."""
        if not hasattr(self, "_finalizers"):
            self._finalizers: list[weakref.finalize] = []
        self._finalizers.append(weakref.finalize(self, fn, *args))

    def __enter__(self) -> RuntimeModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    # -- helpers -------------------------------------------------------------------------
    def _call(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self._lock is None:
            return self._infer(inputs)
        with self._lock:
            return self._infer(inputs)

    def _by_name(self, inputs: Mapping[str, Any]) -> list[Any]:
        """A dict of inputs in input order; a name the model lacks is named (not a shape error)."""
        names = [spec.name for spec in self.input_specs]
        unknown = [key for key in inputs if key not in names]
        missing = [name for name in names if name not in inputs]
        if unknown or missing:
            problems = [f"no input {', '.join(map(repr, unknown))}"] if unknown else []
            problems += [f"missing {missing}"] if missing else []
            raise InvalidInputError(f"the model's inputs are {names}: {'; '.join(problems)}")
        return [inputs[name] for name in names]

    @staticmethod
    def _unknown(key: Any, specs: list[TensorSpec], what: str) -> InvalidInputError:
        valid = f"indices 0..{len(specs) - 1} or names {[s.name for s in specs]}" if specs else "none"
        return InvalidInputError(f"no {what} {key!r}: valid {what}s are {valid}")

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}:{s.dtype.name}{list(s.shape)}" for s in self.input_specs)
        return f"<{type(self).__name__} runtime={self.runtime_name!r} inputs=[{ins}]>"


def refused_option(where: str, owner: str, allowed: Iterable[str]) -> InvalidInputError:
    """The error for an option a device server does not let an uploaded model set."""
    listed = ", ".join(sorted(allowed)) or "none"
    return InvalidInputError(
        f"{where}: a model on a device server may not set options that name files, turn on profiling, "
        f"open connections or belong to another runtime; {owner} allows: {listed}"
    )


def check_option_type(where: str, value: Any, kinds: type | tuple[type, ...]) -> None:
    """`value` must be one of `kinds` (a bool is not an int here)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(kind.__name__ for kind in kinds)
        raise InvalidInputError(f"{where} must be {names}, got {type(value).__name__} {value!r:.80}")


_STATEFUL_METHODS = ("set_input", "run", "get_output")


def _positions(specs: Sequence[TensorSpec]) -> dict[int | str, int]:
    """Map both the index and the name of each tensor to its position."""
    positions: dict[int | str, int] = {}
    for i, spec in enumerate(specs):
        positions[i] = i
        positions.setdefault(spec.name, i)
    return positions


def _percentile(times: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile: a time that was measured, never an interpolation."""
    ranked = sorted(times)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def random_tensor(spec: TensorSpec, dynamic: int = 1, seed: int = 0) -> np.ndarray:
    """Random data for `spec` (dynamic dimensions taken as `dynamic`), for benchmarks and examples."""
    rng = np.random.default_rng(seed)
    shape = spec.example_shape(dynamic)
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, dtype=spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return np.zeros(shape, dtype=spec.dtype)
