"""The usual variants of one ONNX file, built with the libraries arachne-mlflow already uses.

    from arachne_mlflow.flavors import variants, variants_build
    built = variants_build.build_variants("model.onnx", "work/", progress=print)
    variants.save_model({name: b.variant for name, b in built.items()}, "model-variants/")

`onnx` is the file as it is (the reference), `onnx-int8` its weights quantized to int8 by
onnxruntime's own `quantize_dynamic`, `tvm-<this CPU>` compiled by TVM for this machine and
`tvm-aarch64` cross-compiled for 64-bit ARM (it needs `aarch64-linux-gnu-gcc`). Each build is
saved by its flavor into `work_dir/<name>/`; its time and size are reported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.flavors.variants import Variant
from arachne_mlflow.model.arch import machine_arch
from arachne_mlflow.model.directory import read_model_dir

#: What `build_variants` makes by default, in the model's order (the first is the reference).
BUILDS = ("onnx", "onnx-int8", "tvm-host", "tvm-aarch64")
#: A dynamically quantized build rounds weights to 1/127 of their range: it is allowed more.
INT8_TOLERANCE = {"atol": 0.1, "rtol": 0.1, "top1": 0.9}
AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}


@dataclass
class Build:
    """One build: the variant to save, the seconds it took and the bytes of its files."""

    name: str
    variant: Variant
    seconds: float
    bytes: int


def build_variants(
    onnx_file: str | os.PathLike,
    work_dir: str | os.PathLike,
    builds: Iterable[str] = BUILDS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Build]:
    """Build each of `builds` from `onnx_file` into `work_dir` (which must be new or empty); name -> `Build`."""
    onnx_file, work_dir = Path(onnx_file), Path(work_dir)
    builds = list(dict.fromkeys(builds))
    unknown = [b for b in builds if b not in BUILDS]
    if unknown or not builds:
        raise InvalidInputError(f"unknown builds {unknown}: choose from {list(BUILDS)}")
    if not onnx_file.is_file():
        raise ModelNotFoundError(f"ONNX model file not found: {onnx_file}")
    if work_dir.exists() and any(work_dir.iterdir()):
        raise InvalidInputError(f"work directory {work_dir} is not empty")
    work_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    done: dict[str, Build] = {}
    for kind in builds:
        name = _name(kind)
        if name in done:  # tvm-aarch64 on an aarch64 machine is tvm-host
            continue
        say(f"building {name} ...")
        start = time.perf_counter()
        variant = _BUILDERS[kind](onnx_file, work_dir / name)
        seconds = time.perf_counter() - start
        saved = read_model_dir(work_dir / name)
        size = sum((saved.path / f).stat().st_size for f in saved.variant_files())
        done[name] = Build(name, variant, seconds, size)
        say(f"built {name} in {seconds:.1f} s: {size} bytes")
    return done


def _name(kind: str) -> str:
    return f"tvm-{machine_arch()}" if kind == "tvm-host" else kind


def _onnx(onnx_file: Path, target: Path) -> Variant:
    from arachne_mlflow.flavors import onnx as arachne_onnx

    arachne_onnx.save_model(str(onnx_file), target)
    return Variant.from_model_dir(target)


def _onnx_int8(onnx_file: Path, target: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from arachne_mlflow.flavors import onnx as arachne_onnx

    quantized = target.parent / f".{target.name}.onnx"
    try:
        quantize_dynamic(str(onnx_file), str(quantized), weight_type=QuantType.QInt8)
        arachne_onnx.save_model(str(quantized), target)
    finally:
        quantized.unlink(missing_ok=True)
    return Variant.from_model_dir(target, tolerance=INT8_TOLERANCE)


def _tvm(onnx_file: Path, target: Path, tvm_target: dict | str = "llvm") -> Variant:
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from arachne_mlflow.flavors import tvm as arachne_tvm

    try:
        mod, params = relax.frontend.detach_params(from_onnx(onnx.load(str(onnx_file)), keep_params_in_input=True))
    except Exception as err:  # the Relax frontend raises its own errors for operators it lacks
        raise InvalidInputError(f"TVM's ONNX frontend cannot import {onnx_file}: {err}") from err
    func = mod["main"]
    names = [p.name for p in func.params[int(func.attrs["num_input"]) :]]
    weights = {name: value.numpy() for name, value in zip(names, params.get("main", []))}
    arachne_tvm.save_model(mod, target, params=weights, target=tvm_target)
    return Variant.from_model_dir(target)


def _tvm_aarch64(onnx_file: Path, target: Path) -> Variant:
    return _tvm(onnx_file, target, AARCH64_TARGET)


_BUILDERS = {"onnx": _onnx, "onnx-int8": _onnx_int8, "tvm-host": _tvm, "tvm-aarch64": _tvm_aarch64}
