"""TVM backend: a Relax VM executable exported with `export_library` (`.so`, or a `.tar` linked at load).

TVM executables carry parameter names but no dtypes or shapes, so the tensor spec comes from a
`model_spec` (the old env.yaml's), which the MLflow tvm flavor stores for you. Detached weights
come as a dict or a file in TVM's param-dict format, matched to the VM's parameters by name.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError, MissingDependencyError
from arachne_mlflow.model.spec import specs_from_dicts
from arachne_mlflow.runtime.base import RuntimeModule


def import_tvm():
    """TVM, and its Relax VM (`tvm.runtime.vm`), which also works with only TVM's runtime library loaded
    (`TVM_USE_RUNTIME_LIB=1`, as the device server runs it)."""
    try:
        import tvm
        import tvm.runtime.vm
    except ImportError as err:
        raise MissingDependencyError("the tvm runtime needs Apache TVM: pip install 'arachne-mlflow[tvm]'") from err
    return tvm


class TVMRuntimeModule(RuntimeModule):
    """A Relax VM running an exported TVM library on `tvm_device` (`cpu`, `cuda`, ...)."""

    thread_safe = False  # the VM keeps per-call state
    server_options = {"tvm_device": str, "entry": str}

    def __init__(
        self,
        model_file: str | None = None,
        *,
        model_spec: Mapping[str, Any] | None = None,
        tvm_device: str = "cpu",
        params: Mapping[str, Any] | None = None,
        params_file: str | None = None,
        entry: str = "main",
    ):
        if model_file is None:
            raise InvalidInputError("tvm runtime needs model_file (a library from export_library)")
        _refuse_graph_executor_package(model_file)
        _refuse_truncated_library(model_file)
        tvm = import_tvm()
        self._device = _device(tvm, tvm_device)
        try:
            library = _load_library(tvm, model_file)
            self._vm = tvm.runtime.vm.VirtualMachine(library, self._device)
        except Exception as err:  # TVM raises TVMError/RuntimeError for a foreign or broken library
            raise IncompatibleModelError(
                f"tvm runtime: cannot load {model_file} on this machine ({platform.machine()}, {tvm_device}): {err}"
            ) from err
        arity = self._vm._get_function_arity(entry)
        param_names = [self._vm._get_function_param_name(entry, i) for i in range(arity)]
        weights = _load_params(tvm, params, params_file)
        n_inputs = arity - len(weights)
        missing = [name for name in param_names[n_inputs:] if name not in weights]
        if n_inputs < 0 or missing:
            raise InvalidInputError(
                f"tvm runtime: the params do not match {entry}()'s parameters {param_names} "
                f"(params given: {sorted(weights)})"
            )
        self._weights = [
            tvm.runtime.tensor(np.asarray(_numpy(weights[name])), self._device) for name in param_names[n_inputs:]
        ]
        if model_spec is None:
            raise InvalidInputError(
                f"tvm runtime: a TVM library carries no dtypes or shapes (its inputs are {param_names[:n_inputs]}); "
                "pass model_spec={'inputs': [...], 'outputs': [...]} or env_file=, or log it with the tvm flavor"
            )
        inputs = specs_from_dicts(model_spec.get("inputs"))
        outputs = specs_from_dicts(model_spec.get("outputs"))
        if len(inputs) != n_inputs:
            raise InvalidInputError(
                f"tvm runtime: model_spec lists {len(inputs)} inputs but {entry}() takes {n_inputs}: "
                f"{param_names[:n_inputs]}"
            )
        self._function = self._vm[entry]
        self._tensor = tvm.runtime.tensor
        # Inputs of a fixed shape are copied into tensors allocated once: allocating a TVM tensor
        # per call costs more than a small model's whole run. (Calls are serialized by the lock.)
        self._buffers = [
            tvm.runtime.empty(spec.shape, spec.dtype.name, self._device) if spec.is_static else None for spec in inputs
        ]
        self._bind_specs(inputs, outputs)

    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        args = []
        for buffer, x in zip(self._buffers, inputs):
            if buffer is None:
                args.append(self._tensor(x, self._device))
            else:
                buffer.copyfrom(x)
                args.append(buffer)
        result = self._function(*args, *self._weights)
        if hasattr(result, "numpy"):
            return [result.numpy()]
        return [item.numpy() for item in result]

    def _close(self) -> None:
        self._function = self._vm = self._weights = self._buffers = None


def _device(tvm: Any, name: str) -> Any:
    try:
        device = tvm.runtime.device(name)
    except Exception as err:
        raise InvalidInputError(f"unknown tvm_device {name!r}: use cpu, cuda, opencl, vulkan, ...") from err
    if not device.exist:
        raise IncompatibleModelError(f"the model needs TVM device {name!r}, which this machine does not have")
    return device


def _load_params(tvm: Any, params: Mapping[str, Any] | None, params_file: str | None) -> dict[str, Any]:
    if params is not None and params_file is not None:
        raise InvalidInputError("tvm runtime: pass params or params_file, not both")
    if params_file is not None:
        if not os.path.isfile(params_file):
            raise InvalidInputError(f"tvm runtime: params file not found: {params_file}")
        return dict(tvm.runtime.load_param_dict_from_file(params_file))
    return dict(params or {})


def _numpy(value: Any) -> Any:
    return value.numpy() if hasattr(value, "numpy") else value


def _refuse_graph_executor_package(model_file: str) -> None:
    """The old Arachne TVM package was a graph-executor tar, which TVM 0.20+ cannot run."""
    if not tarfile.is_tarfile(model_file):
        return
    with tarfile.open(model_file) as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    if {"mod.json", "mod.params"} <= names:
        raise IncompatibleModelError(
            f"{model_file} is a TVM graph-executor package (mod.json, mod.params); the installed TVM has no "
            "graph executor: recompile the model with Relax (tvm.compile) and export_library"
        )


def _refuse_truncated_library(model_file: str) -> None:
    """dlopen maps an ELF library's segments without checking that the file holds them: a truncated
    library kills the whole process with SIGBUS. Check the headers against the file size first."""
    with open(model_file, "rb") as file:
        head = file.read(64)
        if head[:4] != b"\x7fELF":
            return
        size = os.fstat(file.fileno()).st_size
        wide, order = head[4:5] == b"\x02", "<" if head[5:6] == b"\x01" else ">"
        problem = _elf_extent_problem(file, head, size, wide, order)
    if problem:
        raise IncompatibleModelError(
            f"tvm runtime: cannot load {model_file}: the library is truncated or corrupt "
            f"({problem}; the file has {size} bytes)"
        )


def _elf_extent_problem(file: Any, head: bytes, size: int, wide: bool, order: str) -> str:
    if len(head) < (64 if wide else 52):
        return "its ELF header is cut short"
    fields = struct.unpack_from(order + ("QQQIHHHHHH" if wide else "IIIIHHHHHH"), head, 24)
    phoff, shoff, phentsize, phnum, shentsize, shnum = fields[1], fields[2], *fields[5:9]
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
        return "its program or section headers lie past the end"
    layout = order + ("IIQQQQQQ" if wide else "IIIIIIII")
    for i in range(phnum):
        file.seek(phoff + i * phentsize)
        entry = file.read(struct.calcsize(layout))
        if len(entry) < struct.calcsize(layout):
            return "a program header is cut short"
        values = struct.unpack(layout, entry)
        offset, filesz = (values[2], values[5]) if wide else (values[1], values[4])
        if offset + filesz > size:
            return f"segment {i} ends at byte {offset + filesz}"
    return ""


def _load_library(tvm: Any, model_file: str) -> Any:
    """The library, loaded. A `.tar` (export_library's object files) is linked by TVM into
    `<file>.so` beside the file it is given (a symbolic link resolved first): here, beside a hard link to
    it (a copy across file systems) in a temporary directory, so that loading never writes into the
    model's directory (a device's store, whose files are digested and may be signed). The linked
    library stays mapped once loaded."""
    if not model_file.endswith(".tar"):
        return tvm.runtime.load_module(model_file)
    with tempfile.TemporaryDirectory(prefix="arachne-tvm-link-") as work:
        local = os.path.join(work, os.path.basename(model_file))
        try:
            os.link(model_file, local)
        except OSError:
            shutil.copyfile(model_file, local)
        return tvm.runtime.load_module(local)
