"""MLflow flavor for one network built several ways: one model version, a variant per kind of device.

    from arachne_mlflow.flavors import variants
    info = variants.log_model(
        {
            "onnx": variants.Variant("onnx", "model.onnx"),
            "onnx-int8": variants.Variant("onnx", "model-int8.onnx", tolerance={"atol": 0.05, "top1": 0.9}),
            "tvm-jetson": variants.Variant("tvm", ir_module, params=weights, target=AARCH64_CUDA,
                                           requires={"tvm_devices": ["cuda"]}),
        },
        name="model", input_example=x, registered_model_name="detector",
    )

Each variant is saved by its runtime's flavor (so it is checked the way that flavor checks a
model) into `variants/<name>/`. The first variant is the reference: every other variant that
runs on this machine is run on the input example and compared with it (`agreement.py`); one
outside its tolerance fails the save with the figures. Variants that cannot run here are
checked against the signature only. Loading picks the first variant that runs on the machine
(`model/variants.py`); MLmodel's shape is in docs/flavors.md.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import _common
from arachne_mlflow.flavors.agreement import DEFAULT_TOLERANCE, compare_outputs, example_inputs
from arachne_mlflow.model.directory import (
    FLAVOR_NAME,
    MAX_VARIANTS,
    VARIANT_NAME,
    ArachneModel,
    checked_requires,
    checked_tolerance,
    read_model_dir,
)
from arachne_mlflow.model.variants import this_machine, unmet_requirements

VARIANTS_DIR = "variants"
_EXAMPLE_WORDS = {"input_example": "input example", "generated": "generated example"}
_FLAVORS = {
    "onnx": "arachne_mlflow.flavors.onnx",
    "tvm": "arachne_mlflow.flavors.tvm",
    "tflite": "arachne_mlflow.flavors.tflite",
}
__all__ = ["FLAVOR_NAME", "Variant", "get_default_pip_requirements", "save_model", "log_model", "load_model"]


class Variant:
    """One build: `model` as its runtime's flavor takes it, with keyword arguments of that flavor's
    `save_model` (`runtime_options`, `params`, `target`, `arch`, ...); what it `requires` of a device
    beyond its runtime (and, for TVM, its CPU and device); its `tolerance` against the reference."""

    def __init__(
        self,
        runtime: str,
        model: Any,
        *,
        requires: Mapping[str, Any] | None = None,
        tolerance: Mapping[str, float] | None = None,
        **save_kwargs: Any,
    ):
        if runtime not in _FLAVORS:
            raise InvalidInputError(f"a variant's runtime is one of {sorted(_FLAVORS)}, got {runtime!r}")
        self.runtime, self.model, self.save_kwargs = runtime, model, save_kwargs
        self.requires = checked_requires(dict(requires or {}), "Variant(requires=...)")
        self.tolerance = checked_tolerance(dict(tolerance or {}), "Variant(tolerance=...)")
        #: True for a model saved already (`from_model_dir`): its files are copied as they are.
        self.saved = False

    @classmethod
    def from_model_dir(
        cls,
        path: str | os.PathLike,
        requires: Mapping[str, Any] | None = None,
        tolerance: Mapping[str, float] | None = None,
    ) -> Variant:
        """A model saved by one of the arachne flavors (`save_model`), taken as it is."""
        model = read_model_dir(path)
        if model.has_variants:
            raise InvalidInputError(f"{path} holds variants itself: a variant is a model with one build")
        variant = cls(model.runtime, Path(path), requires=requires, tolerance=tolerance)
        variant.saved = True
        return variant


def get_default_pip_requirements(runtimes: tuple[str, ...] = ("onnx", "tvm")) -> list[str]:
    """The requirements of each runtime's flavor, once each."""
    requirements: list[str] = []
    for name in runtimes:
        requirements += importlib.import_module(_FLAVORS[name]).get_default_pip_requirements()
    return list(dict.fromkeys(requirements))


def save_model(
    model: Mapping[str, Variant | str | os.PathLike],
    path: str | os.PathLike,
    conda_env=None,
    code_paths: list[str] | None = None,
    mlflow_model=None,
    signature: ModelSignature | None = None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    metadata: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    labels: Any = None,
    image_format: str | dict[str, str] | None = None,
    capture: dict[str, Any] | None = None,
) -> None:
    """Save the variants `model` (name -> `Variant`, or the directory of a saved arachne model) at `path`.

    `batching`, `labels`, `image_format` and `capture` are the model's, shared by every variant (docs/flavors.md).

    The first is the reference. Without `signature` the reference's is used, and every other
    variant must match it. Without `input_example` the agreement check runs on generated inputs.
    """
    builds = _checked_builds(model)
    runtimes = tuple(dict.fromkeys(build.runtime for build in builds.values()))

    def write(directory: Path) -> _common.ModelFiles:
        return _write_variants(directory, builds, signature, input_example)

    _common.save_model(
        next(iter(builds.values())).runtime,
        path,
        write,
        lambda: get_default_pip_requirements(runtimes),
        conda_env=conda_env,
        code_paths=code_paths,
        mlflow_model=mlflow_model,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        batching=batching,
        labels=labels,
        image_format=image_format,
        capture=capture,
    )


def log_model(
    model: Mapping[str, Variant | str | os.PathLike],
    name: str | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    signature: ModelSignature | None = None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """Log the variants to the active run (or none); returns MLflow's `ModelInfo`. The agreement of
    each variant with the reference is also logged as metrics (`variant.<name>.max_abs_diff`, ...)."""
    info = _common.log_model(
        sys.modules[__name__],
        model,
        name,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        batching=batching,
        **kwargs,
    )
    metrics = agreement_metrics(info.flavors[FLAVOR_NAME]["variants"])
    if metrics and info.run_id:
        import mlflow

        mlflow.log_metrics(metrics, run_id=info.run_id, model_id=info.model_id)
    return info


def load_model(model_uri: str, dst_path: str | None = None, variant: str | None = None, **runtime_options: Any):
    """Load `variant`, or the first variant that runs on this machine, as a `RuntimeModule`."""
    return _common.load_model(None, model_uri, dst_path, variant=variant, **runtime_options)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    return _common.load_pyfunc(path, model_config)


def agreement_metrics(blocks: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of what each variant's check measured against the reference."""
    metrics = {}
    for block in blocks:
        for key in ("max_abs_diff", "top1_agreement"):
            if key in (block.get("check") or {}):
                metrics[f"variant.{block['name']}.{key}"] = float(block["check"][key])
    return metrics


# -- saving -------------------------------------------------------------------------------
def _checked_builds(model: Any) -> dict[str, Variant]:
    if not isinstance(model, Mapping) or not model:
        raise InvalidInputError("variants are a mapping name -> Variant (or a saved arachne model directory)")
    if len(model) > MAX_VARIANTS:
        raise InvalidInputError(f"{len(model)} variants: at most {MAX_VARIANTS}")
    builds = {}
    for name, build in model.items():
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise InvalidInputError(f"variant name {name!r} must match {VARIANT_NAME.pattern}")
        if isinstance(build, (str, os.PathLike)):
            build = Variant.from_model_dir(build)
        if not isinstance(build, Variant):
            raise InvalidInputError(
                f"variant {name!r}: expected a Variant or a model directory, got {type(build).__name__}"
            )
        builds[name] = build
    return builds


def _write_variants(
    directory: Path, builds: dict[str, Variant], signature: ModelSignature | None, input_example: Any
) -> _common.ModelFiles:
    """Each build saved by its flavor into a scratch directory, checked, then its files moved to `variants/<name>/`."""
    scratch = directory / ".variants-scratch"
    blocks: list[dict[str, Any]] = []
    try:
        saved = {name: _save_build(build, scratch / name, signature) for name, build in builds.items()}
        signature = signature or _model_signature(list(saved.values()))
        specs = _common.from_mlflow_signature(signature)
        for name, model in saved.items():  # the flavors checked a given signature; an inferred one is checked here
            try:
                _common.check_signature(signature, (model.inputs, model.outputs), model.runtime, model.runtime != "tvm")
            except InvalidInputError as err:
                raise InvalidInputError(f"variant {name!r} does not match the model's signature: {err}") from err
        inputs, example = example_inputs(input_example, specs[0])
        reference: tuple[str, list[np.ndarray] | None] | None = None
        for name, build in builds.items():
            outputs, why_not = _run_here(saved[name], build, inputs)
            if reference is None:
                reference = (name, outputs)
                check = {"reference": True, "ran": outputs is not None}
            else:
                check = _check_against(name, build, reference, outputs, example)
            check["signature"] = "matches"
            if why_not:
                check["not_run"] = why_not
            else:
                check["example"] = example
            blocks.append(_variant_block(name, build, saved[name], check, directory, move=not build.saved))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    first = blocks[0]
    return _common.ModelFiles(
        first["model_file"],
        runtime_options=first.get("runtime_options") or {},
        tvm=first.get("tvm") or {},
        specs=specs,
        loadable=False,  # each build was loaded (where it runs here) and checked above
        extra_files=first.get("extra_files") or [],
        variants=blocks,
    )


def _model_signature(saved: list[ArachneModel]) -> ModelSignature:
    """The first build's signature whose output names are the network's (a TVM library names none)."""
    named = [model for model in saved if model.runtime != "tvm"] or saved
    return ModelSignature.from_dict(named[0].mlmodel["signature"])


def _save_build(build: Variant, target: Path, signature: ModelSignature | None) -> ArachneModel:
    if build.saved:
        saved = read_model_dir(build.model)
        if signature is not None:
            _common.check_signature(signature, (saved.inputs, saved.outputs), saved.runtime, saved.runtime != "tvm")
        return saved
    flavor = importlib.import_module(_FLAVORS[build.runtime])
    flavor.save_model(build.model, target, signature=signature, **build.save_kwargs)
    return read_model_dir(target)


def _run_here(saved: ArachneModel, build: Variant, inputs: list[np.ndarray]) -> tuple[list[np.ndarray] | None, str]:
    """The build's outputs on `inputs`, or None and why it cannot run on this machine."""
    view = _with_requires(saved, build)
    unmet = unmet_requirements(view, this_machine([view]))
    if unmet:
        return None, "; ".join(unmet)
    with arachne_runtime.load(view) as module:
        return module.infer(inputs), ""


def _with_requires(saved: ArachneModel, build: Variant) -> ArachneModel:
    return replace(saved, requires=build.requires)


def _check_against(
    name: str,
    build: Variant,
    reference: tuple[str, list[np.ndarray] | None],
    outputs: list[np.ndarray] | None,
    example: str,
) -> dict[str, Any]:
    """The agreement of `outputs` with the reference's; `InvalidInputError` with the figures when outside tolerance."""
    ref_name, ref_outputs = reference
    if outputs is None or ref_outputs is None:
        return {"ran": outputs is not None}
    tolerance = {**DEFAULT_TOLERANCE, **build.tolerance}
    figures = compare_outputs(ref_outputs, outputs, tolerance)
    if not figures.pop("within_tolerance"):
        raise InvalidInputError(
            f"variant {name!r} disagrees with the reference variant {ref_name!r} on the {_EXAMPLE_WORDS[example]}: "
            f"{figures['summary']} (its tolerance: {tolerance}; pass Variant(..., tolerance=...) if that is expected)"
        )
    figures.pop("summary")
    return {"ran": True, **figures}


def _variant_block(
    name: str, build: Variant, saved: ArachneModel, check: dict[str, Any], directory: Path, move: bool
) -> dict[str, Any]:
    """The build's files under `variants/<name>/`, and its entry in MLmodel's `variants` list."""
    prefix = f"{VARIANTS_DIR}/{name}"
    for relative in saved.variant_files():
        target = directory / prefix / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.move if move else shutil.copyfile)(saved.path / relative, target)
    block: dict[str, Any] = {
        "name": name,
        "runtime": saved.runtime,
        "model_file": f"{prefix}/{saved.model_file}",
        "runtime_options": saved.runtime_options,
    }
    if saved.tvm:
        block["tvm"] = dict(saved.tvm)
        if saved.tvm.get("params_file"):
            block["tvm"]["params_file"] = f"{prefix}/{saved.tvm['params_file']}"
    if saved.extra_files:
        block["extra_files"] = [f"{prefix}/{f}" for f in saved.extra_files]
    if build.requires:
        block["requires"] = build.requires
    if build.tolerance:
        block["tolerance"] = build.tolerance
    block["check"] = check
    return block
