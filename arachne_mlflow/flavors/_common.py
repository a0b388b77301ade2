"""What the three flavors share, once: save/log/load, signatures, requirements, the MLmodel blocks.

A flavor module only writes its model file(s) into the new model directory and says what it
wrote (`ModelFiles`); everything MLflow-shaped around that happens here, the way MLflow's own
flavors (`mlflow/onnx/__init__.py`) do it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _validate_and_copy_code_paths
from mlflow.utils.requirements_utils import _get_pinned_requirement

from arachne_mlflow import __version__
from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors._vision import image_formats_block, write_labels
from arachne_mlflow.model.batching import BatchingSettings, batchable
from arachne_mlflow.model.capture_rules import parse_rules
from arachne_mlflow.model.directory import (
    FLAVOR_NAME,
    ArachneModel,
    mlflow_dtype,
    parse_signature,
    read_model_dir,
    tensor_dtypes,
)
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.model.variants import choose_variant, this_machine

_logger = logging.getLogger(__name__)

PYFUNC_LOADER_MODULE = "arachne_mlflow.pyfunc"
Specs = tuple[list[TensorSpec], list[TensorSpec]]


@dataclass
class ModelFiles:
    """What a flavor wrote into the model directory, and what it knows about the model."""

    model_file: str
    runtime_options: dict[str, Any] = field(default_factory=dict)
    tvm: dict[str, Any] = field(default_factory=dict)
    #: The tensor spec when known without loading the model (TVM); None: load it to find out.
    specs: Specs | None = None
    #: False when the spec's output names are placeholders (a Relax function names no outputs).
    output_names_known: bool = True
    #: False for a model built for another machine (TVM): its spec is then taken as given.
    loadable: bool = True
    #: Files beside `model_file` that loading it needs (ONNX external data).
    extra_files: list[str] = field(default_factory=list)
    #: Further MLflow flavor blocks to write (MLflow's own `onnx` flavor).
    extra_flavors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The `variants` list of a model with several builds (flavors/variants.py); the fields above
    #: then describe the first (reference) one.
    variants: list[dict[str, Any]] | None = None


# -- requirements -------------------------------------------------------------------------
def pinned_requirements(*packages: str) -> list[str]:
    """`package==installed version` for each package, plus arachne-mlflow itself."""
    return [_get_pinned_requirement(name) for name in (*packages, "arachne-mlflow")]


def default_conda_env(pip_requirements: list[str]) -> dict[str, Any]:
    return _mlflow_conda_env(additional_pip_deps=pip_requirements)


def _write_environment(path: Path, default_reqs, conda_env, pip_requirements, extra_pip_requirements) -> None:
    if conda_env is None:
        defaults = default_reqs if pip_requirements is None else None
        conda_env, pip_reqs, constraints = _process_pip_requirements(defaults, pip_requirements, extra_pip_requirements)
    else:
        conda_env, pip_reqs, constraints = _process_conda_env(conda_env)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


# -- signatures ---------------------------------------------------------------------------
def to_mlflow_signature(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelSignature:
    """MLflow's signature of the specs; a dtype MLflow cannot read back (bfloat16) is written as
    float32 there, and the true one in the arachne flavor block (`tensor_dtypes`)."""

    def schema(specs):
        return Schema([MlflowTensorSpec(mlflow_dtype(s.dtype), s.shape, s.name) for s in specs])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs) if outputs else None)


def from_mlflow_signature(signature: ModelSignature) -> Specs:
    """Our TensorSpecs from an MLflow signature, through the one MLmodel signature parser."""
    if not isinstance(signature, ModelSignature):
        raise InvalidInputError(f"signature must be an mlflow.models.ModelSignature, got {type(signature).__name__}")
    if signature.inputs is None:
        raise InvalidInputError("signature has no inputs")
    if not signature.inputs.is_tensor_spec() or (
        signature.outputs is not None and not signature.outputs.is_tensor_spec()
    ):
        raise InvalidInputError("signature must be tensor-based (mlflow.types.TensorSpec), not column-based")
    inputs, outputs = parse_signature(signature.to_dict())
    if any(not s.name for s in signature.inputs.inputs):
        raise InvalidInputError("every input TensorSpec of the signature needs the model's input name")
    return inputs, outputs


def check_signature(signature: ModelSignature, specs: Specs, runtime: str, output_names: bool = True) -> None:
    """Raise `InvalidInputError` naming the first tensor where `signature` disagrees with the model.

    A dimension may be narrower than the model's (a fixed size where the model's is dynamic).
    The leading dimension may be -1 where the model's is fixed, so that MLflow lets larger
    batches through to the pyfunc loader, which runs them in chunks; not for TVM, whose runtime
    takes its tensor spec from the signature and would then pass the whole batch to the library.
    """
    given_in, given_out = from_mlflow_signature(signature)
    model_in, model_out = specs
    _check_side("input", given_in, model_in, runtime != "tvm", names=True)
    if given_out:
        _check_side("output", given_out, model_out, runtime != "tvm", names=output_names)


def _check_side(what: str, given: list[TensorSpec], model: list[TensorSpec], loosen_batch: bool, names: bool) -> None:
    if len(given) != len(model):
        raise InvalidInputError(
            f"signature has {len(given)} {what}s {[s.name for s in given]}, the model has {len(model)}: "
            f"{[s.name for s in model]}"
        )
    for g, m in zip(given, model):
        if names and g.name != m.name:
            raise InvalidInputError(f"signature {what} {g.name!r}: the model's {what} at this position is {m.name!r}")
        if mlflow_dtype(g.dtype) != mlflow_dtype(m.dtype):  # (a bfloat16 tensor is float32 to MLflow)
            raise InvalidInputError(f"signature {what} {g.name!r}: dtype {g.dtype.name}, the model's is {m.dtype.name}")
        ok = len(g.shape) == len(m.shape) and all(
            want == got or want == -1 or (axis == 0 and got == -1 and loosen_batch)
            for axis, (want, got) in enumerate(zip(m.shape, g.shape))
        )
        if not ok:
            raise InvalidInputError(
                f"signature {what} {g.name!r}: shape {list(g.shape)} does not fit the model's {list(m.shape)}"
            )


def _resolve_signature(
    runtime: str, path: Path, files: ModelFiles, signature: ModelSignature | None
) -> tuple[ModelSignature, Specs]:
    """The given signature checked against the model, or one inferred from it; and the model's specs."""
    specs = files.specs
    if files.loadable:
        model = ArachneModel(
            path=path,
            runtime=runtime,
            model_file=files.model_file,
            runtime_options=files.runtime_options,
            tvm=files.tvm,
            inputs=list(specs[0]) if specs else [],
            outputs=list(specs[1]) if specs else [],
        )
        with arachne_runtime.load(model) as module:
            loaded = (module.input_specs, module.output_specs)
    elif specs is not None:
        _logger.info("model %s is for another machine: its tensor spec is taken as given", files.model_file)
        loaded = specs
    else:
        raise InvalidInputError(f"model {files.model_file} cannot load here, so its tensor spec must be given")
    if signature is None:
        return to_mlflow_signature(*loaded), loaded
    check_signature(signature, loaded, runtime, output_names=files.output_names_known)
    given = from_mlflow_signature(signature)
    if tensor_dtypes(*given):  # a signature naming bfloat16 (ml_dtypes imported): as MLflow can read it back
        signature = to_mlflow_signature(*given)
    return signature, loaded


# -- save / log / load --------------------------------------------------------------------
def save_model(
    runtime: str,
    path: str | os.PathLike,
    write_files: Callable[[Path], ModelFiles],
    default_pip_requirements: Callable[[], list[str]],
    *,
    conda_env=None,
    code_paths=None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    metadata: dict[str, Any] | None = None,
    batching: dict[str, Any] | None = None,
    labels: Any = None,
    image_format: Any = None,
    capture: Any = None,
) -> None:
    """Write an MLflow model directory at `path` (which must not exist or be empty).

    `batching` declares that the model's first dimension is a batch (MLmodel's `arachne.batching`,
    see `model/batching.py`): a device server batches only the models that declare one.
    `labels` (a file or a list, for the first output; or a mapping of output names to either) and
    `image_format` ("NCHW" or "NHWC" for the first input, or a mapping of input names to one) are
    what vision clients read (`model/vision.py`, `flavors/_vision.py`). `capture` are the field capture
    rules a device applies (MLmodel's `arachne.capture`, `model/capture_rules.py`), checked here.
    """
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InvalidInputError(f"cannot save the model to {path}: it already exists and is not empty")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        files = write_files(path)
        code_dir = _validate_and_copy_code_paths(code_paths, str(path))
        mlflow_model = mlflow_model or Model()
        mlflow_model.signature, specs = _resolve_signature(runtime, path, files, signature)
        if input_example is not None:
            _save_example(mlflow_model, input_example, str(path))
        if metadata is not None:
            mlflow_model.metadata = metadata
        pyfunc.add_to_model(
            mlflow_model,
            loader_module=PYFUNC_LOADER_MODULE,
            code=code_dir,
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
            # MLflow lets `load_model(model_config=...)` override only the keys stored here
            model_config={"variant": ""} if files.variants else dict(files.runtime_options) or None,
        )
        block: dict[str, Any] = {
            "runtime": runtime,
            "model_file": files.model_file,
            "runtime_options": files.runtime_options,
        }
        if files.tvm:
            block["tvm"] = files.tvm
        if files.extra_files:
            block["extra_files"] = files.extra_files
        if dtypes := tensor_dtypes(*specs):
            block["tensor_dtypes"] = dtypes
        if batching is not None:
            block["batching"] = _checked_batching(batching, specs)
        if image_format is not None:
            block["image_formats"] = image_formats_block(image_format, specs[0])
        if labels is not None:
            block["labels"] = write_labels(labels, specs[1], path)
        if capture_rules := _checked_capture(capture):
            block["capture"] = capture_rules
        if files.variants:
            block["variants"] = files.variants
        mlflow_model.add_flavor(FLAVOR_NAME, **block, arachne_mlflow_version=__version__, code=code_dir)
        for name, conf in files.extra_flavors.items():
            mlflow_model.add_flavor(name, **conf, code=code_dir)
        if size := get_total_file_size(str(path)):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(str(path / MLMODEL_FILE_NAME))
        _write_environment(path, default_pip_requirements(), conda_env, pip_requirements, extra_pip_requirements)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if not created:
            path.mkdir()  # it was an empty directory: leave it as found
        raise


def _checked_capture(capture: Any) -> dict[str, Any]:
    """The capture rules as MLmodel keeps them; refused (naming the key) unless a device can read them."""
    rules = parse_rules(capture, "capture")
    return {} if rules is None else rules.to_dict()  # ({} or None: capture off, no key)


def _checked_batching(batching: Any, specs: Specs) -> dict[str, Any]:
    """The `batching` declaration, refused if its keys are wrong or the model's tensors cannot batch."""
    BatchingSettings.from_config(batching, "batching")
    if not batchable(*specs):
        shapes = {spec.name: list(spec.shape) for spec in (*specs[0], *specs[1])}
        raise InvalidInputError(
            f"batching declares a batch, but a batch needs a dynamic leading dimension (-1) on every input and "
            f"output; the model's tensors are {shapes}"
        )
    return dict(batching)


def log_model(
    flavor, model: Any, name: str | None, signing_key: str | None = None, signing_password: str | None = None, **kwargs
):
    """Log through `Model.log`, which calls `flavor.save_model`; returns MLflow's `ModelInfo`.

    `signing_key` (an elliptic-curve private key, PEM) signs the registered version once it exists
    (`flavors/signing.py`): the release names its version, which registering assigns after the upload,
    and MLflow may rewrite MLmodel after the flavor wrote it; so it needs `registered_model_name`.
    """
    if signing_key is not None and not kwargs.get("registered_model_name"):
        raise InvalidInputError("signing_key signs a registered version: give registered_model_name too")
    if signing_key is not None:
        from arachne_mlflow.flavors.signing import check_signing_key, sign_model_version

        check_signing_key(signing_key, signing_password)  # a key that cannot sign is refused before logging
    kwargs.setdefault("artifact_path", None)  # MLflow 3 names the model with `name`; artifact_path is deprecated
    info = Model.log(name=name, flavor=flavor, model=model, **kwargs)
    if signing_key is not None:
        uri = f"models:/{kwargs['registered_model_name']}/{info.registered_model_version}"
        sign_model_version(uri, signing_key, signing_password)
    return info


def load_model(
    runtime: str | None,
    model_uri: str,
    dst_path: str | None = None,
    variant: str | None = None,
    **runtime_options: Any,
):
    """Download the model at `model_uri` and load it with the unified runtime (a `RuntimeModule`).

    Of a model with variants it loads `variant`, else the first of `runtime`'s (any runtime's
    when None) that runs on this machine.
    """
    local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    model = read_model_dir(local_path, variant=variant)
    if model.has_variants and variant is None and runtime is not None and model.runtime != runtime:
        model = _first_of_runtime(model, runtime, model_uri)
    if runtime is not None and model.runtime != runtime:
        raise InvalidInputError(
            f"{model_uri} is a {model.runtime!r} model: load it with arachne_mlflow.flavors.{model.runtime}.load_model"
        )
    _add_code_from_conf_to_system_path(local_path, model.mlmodel["flavors"][FLAVOR_NAME])
    return arachne_runtime.load(model, **runtime_options)


def _first_of_runtime(model: ArachneModel, runtime: str, model_uri: str) -> ArachneModel:
    """The first variant of `runtime` that runs here (the model's choice was another runtime's)."""
    of_runtime = [v for v in model.variants if v.runtime == runtime]
    if not of_runtime:
        raise InvalidInputError(
            f"{model_uri} has no {runtime!r} variant (its variants: "
            f"{[(v.variant_name, v.runtime) for v in model.variants]}): load it with arachne_mlflow.flavors.variants"
        )
    chosen = choose_variant(of_runtime, this_machine(of_runtime)).required(f"this machine ({runtime} variants)")
    return model.variant(chosen.variant_name)


def load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    from arachne_mlflow.pyfunc import _load_pyfunc

    return _load_pyfunc(path, model_config)
