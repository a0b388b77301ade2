"""The registry of runtime backends: built-ins, `@register_runtime` plugins and entry points.

Built-in backends and entry-point plugins are known by name and imported only when first used,
so listing or picking one never loads a DNN library that is not needed. A name is taken once:
registering a different class under a taken name raises instead of replacing it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from arachne_mlflow.errors import DuplicateRuntimeError, UnknownRuntimeError
from arachne_mlflow.runtime.base import RuntimeModule

ENTRY_POINT_GROUP = "arachne_mlflow.runtimes"

_logger = logging.getLogger(__name__)

# name -> "module:attribute", imported on first use
_BUILTINS = {
    "tflite": "arachne_mlflow.runtime.tflite:TFLiteRuntimeModule",
    "onnx": "arachne_mlflow.runtime.onnx:ONNXRuntimeModule",
    "tvm": "arachne_mlflow.runtime.tvm:TVMRuntimeModule",
}

_classes: dict[str, type[RuntimeModule]] = {}
_lazy: dict[str, str] = dict(_BUILTINS)
_entry_points_scanned = False
_guard = threading.RLock()

R = TypeVar("R", bound=type[RuntimeModule])


def register_runtime(name: str) -> Callable[[R], R]:
    """Class decorator that registers a `RuntimeModule` subclass as runtime `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_runtime needs a non-empty runtime name")

    def decorate(cls: R) -> R:
        _add(name, cls)
        return cls

    return decorate


def _add(name: str, cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, RuntimeModule)):
        raise TypeError(f"runtime {name!r}: {cls!r} is not a subclass of arachne_mlflow.runtime.RuntimeModule")
    with _guard:
        existing = _classes.get(name)
        claimed = _target(existing) if existing is not None else _lazy.get(name)
        if claimed is not None and claimed != _target(cls):
            raise DuplicateRuntimeError(
                f"runtime {name!r} is already registered by {claimed}; {_target(cls)} cannot take the same name"
            )
        cls.runtime_name = name
        _classes[name] = cls


def list_runtimes() -> list[str]:
    """Names of every known runtime: built-ins, registered classes and entry-point plugins."""
    _scan_entry_points()
    with _guard:
        return sorted(set(_classes) | set(_lazy))


def get_runtime_class(name: str) -> type[RuntimeModule]:
    """The backend class for `name`, importing it on first use."""
    with _guard:
        cls = _classes.get(name)
    if cls is not None:
        return cls
    _scan_entry_points()
    with _guard:  # (again: another thread may have imported it meanwhile, moving it from _lazy to _classes)
        cls, target = _classes.get(name), _lazy.get(name)
    if cls is not None:
        return cls
    if target is None:
        raise UnknownRuntimeError(f"unknown runtime {name!r}; known runtimes: {list_runtimes()}")
    module_name, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    with _guard:
        _lazy.pop(name, None)
        if _classes.get(name) is not obj:  # a plugin module may register itself with the decorator
            _add(name, obj)
        return _classes[name]


def _scan_entry_points() -> None:
    global _entry_points_scanned
    with _guard:
        if _entry_points_scanned:
            return
        _entry_points_scanned = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            taken = _lazy.get(ep.name) or (_target(_classes[ep.name]) if ep.name in _classes else None)
            if taken and taken != ep.value:
                _logger.error(
                    "runtime plugin %r from entry point %s is ignored: the name is already taken by %s",
                    ep.name,
                    ep.value,
                    taken,
                )
                continue
            _lazy.setdefault(ep.name, ep.value)


def _target(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
