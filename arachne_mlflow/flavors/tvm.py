"""MLflow flavor for TVM models: Relax VM libraries from `export_library`, or Relax modules compiled here.

    from arachne_mlflow.flavors import tvm as arachne_tvm
    arachne_tvm.log_model(ir_module, name="model", params=weights)             # compiled here for llvm
    arachne_tvm.log_model("model.so", name="model", params_file="params.bin", env_file="env.yaml")
    arachne_tvm.log_model(ir_module, name="model", params=weights,                # cross-compiled: linked by
                          target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"})  # aarch64-linux-gnu-gcc

A TVM library carries no tensor spec: it comes from the Relax module when compiled here, else
from `signature`, `model_spec` or an old `env.yaml`. MLmodel's `arachne.tvm` block records the
device, the target and the CPU architecture, so a machine that cannot run the model says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.flavors import _common
from arachne_mlflow.model.arch import machine_arch, normalize_arch
from arachne_mlflow.model.directory import FLAVOR_NAME
from arachne_mlflow.model.spec import TensorSpec, specs_from_dicts

RUNTIME = "tvm"
PARAMS_FILE = "params.bin"
DEFAULT_TARGET = "llvm"
__all__ = [
    "FLAVOR_NAME",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "save_model",
    "log_model",
    "load_model",
]


def get_default_pip_requirements() -> list[str]:
    """Apache TVM and arachne-mlflow, pinned to the installed versions."""
    return _common.pinned_requirements("apache-tvm")


def get_default_conda_env() -> dict[str, Any]:
    return _common.default_conda_env(get_default_pip_requirements())


def save_model(
    model: Any,
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
    runtime_options: dict[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    params_file: str | os.PathLike | None = None,
    model_spec: Mapping[str, Any] | None = None,
    env_file: str | os.PathLike | None = None,
    tvm_device: str | None = None,
    target: str | Mapping[str, Any] | None = None,
    arch: str | None = None,
    cc: str | None = None,
    labels: Any = None,
    image_format: str | dict[str, str] | None = None,
    capture: dict[str, Any] | None = None,
) -> None:
    """Save a TVM model as an MLflow model at `path`.

    `model` is a library path (`.so`/`.tar` from `export_library`), a Relax executable, or a
    Relax `IRModule` (compiled here with `tvm.compile` for `target`, default llvm). Detached
    weights come as `params` (name -> array) or `params_file` (TVM's param-dict format).
    `batching` declares the first dimension a batch (MLmodel `arachne.batching`, docs/flavors.md).
    `labels` (a file or a list of class labels) and `image_format` ("NCHW" or "NHWC") are for vision
    clients: see docs/flavors.md.
    `capture` are the rules of the field samples a device keeps (docs/capture.md), checked here.
    `target` is a TVM target: a kind name, its JSON form, a dict or a `tvm.target.Target`.
    `tvm_device` (default cpu, or the env.yaml's) is where it runs; `arch` the CPU it was built
    for (default: the target's `mtriple` CPU when compiled here, else this machine's: pass it for
    a cross-compiled library). `cc` is the compiler that links a library compiled here (default:
    `<mtriple>-gcc` when the target is for another CPU and one is installed, else TVM's choice).
    A model for another CPU is not loaded here to check it.
    """
    env = None
    if env_file is not None:
        from arachne_mlflow.model.legacy import read_env_file

        env = read_env_file(env_file)
        model_spec = model_spec or (env.model_spec if env.inputs else None)
    if params is not None and params_file is not None:
        raise InvalidInputError("pass params or params_file, not both")
    if cc is not None and _is_path(model):
        raise InvalidInputError("cc= links a library compiled here; a library from export_library is already linked")
    if params_file is not None and not _is_path(model):
        params, params_file = _read_params(params_file), None  # compiled here: keep only the weights main takes

    def write(directory: Path) -> _common.ModelFiles:
        tvm_conf: dict[str, Any] = {"device": tvm_device or (env.tvm_device if env else None) or "cpu"}
        if _is_path(model):
            model_file, ir_specs = _copy_library(model, directory), None
            if target:
                tvm_conf["target"] = target if isinstance(target, str) else _target_json(target)
        else:
            model_file, ir_specs, tvm_conf["target"] = _export(model, directory, params, target or DEFAULT_TARGET, cc)
        tvm_conf["arch"] = normalize_arch(arch or _triple_cpu(_target_triple(tvm_conf.get("target"))) or machine_arch())
        # A Relax function names its inputs but not its outputs; else the spec is the caller's.
        specs = ir_specs or _given_specs(signature, model_spec)
        if specs is None:
            raise InvalidInputError(
                "a TVM library carries no tensor spec: pass signature=, model_spec= or env_file=, "
                "or give the Relax IRModule so the spec is read from its main function"
            )
        if params_file is not None:
            if not Path(params_file).is_file():
                raise ModelNotFoundError(f"params file not found: {params_file}")
            shutil.copyfile(params_file, directory / PARAMS_FILE)
        elif params is not None and not (directory / PARAMS_FILE).is_file():
            _save_params(params, directory / PARAMS_FILE)
        if (directory / PARAMS_FILE).is_file():
            tvm_conf["params_file"] = PARAMS_FILE
        return _common.ModelFiles(
            model_file,
            runtime_options=dict(runtime_options or {}),
            tvm=tvm_conf,
            specs=specs,
            output_names_known=ir_specs is None,
            loadable=_runs_here(tvm_conf),
        )

    _common.save_model(
        RUNTIME,
        path,
        write,
        get_default_pip_requirements,
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
    model: Any,
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
    runtime_options: dict[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    params_file: str | os.PathLike | None = None,
    model_spec: Mapping[str, Any] | None = None,
    env_file: str | os.PathLike | None = None,
    tvm_device: str | None = None,
    target: str | Mapping[str, Any] | None = None,
    arch: str | None = None,
    cc: str | None = None,
    **kwargs: Any,
):
    """Log a TVM model to the active run (or none); returns MLflow's `ModelInfo`.

    `params` reach `save_model` as a file: `Model.log` takes a `params` argument of its own (the
    logged model's parameters) and would record the weights there instead.
    """
    if params is not None and params_file is not None:
        raise InvalidInputError("pass params or params_file, not both")
    with tempfile.TemporaryDirectory(prefix="arachne-tvm-") as scratch:
        if params is not None:
            params_file = Path(scratch) / PARAMS_FILE
            _save_params(params, params_file)
        return _common.log_model(
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
            runtime_options=runtime_options,
            params_file=params_file,
            model_spec=model_spec,
            env_file=env_file,
            tvm_device=tvm_device,
            target=target,
            arch=arch,
            cc=cc,
            **kwargs,
        )


def load_model(model_uri: str, dst_path: str | None = None, **runtime_options: Any):
    """Load the model as a `RuntimeModule`; `runtime_options` override the stored ones."""
    return _common.load_model(RUNTIME, model_uri, dst_path, **runtime_options)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None):
    return _common.load_pyfunc(path, model_config)


def _is_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike))


def _runs_here(tvm_conf: dict[str, Any]) -> bool:
    """Whether this machine has the CPU architecture and the device the model was built for."""
    if tvm_conf["arch"] != machine_arch():
        return False
    from arachne_mlflow.runtime.tvm import import_tvm

    try:
        return bool(import_tvm().runtime.device(tvm_conf["device"]).exist)
    except Exception as err:  # TVM raises ValueError/TVMError for a device name it does not know
        raise InvalidInputError(
            f"unknown tvm_device {tvm_conf['device']!r}: use cpu, cuda, opencl, vulkan, ..."
        ) from err


def _given_specs(signature: ModelSignature | None, model_spec: Mapping[str, Any] | None):
    if signature is not None:
        return _common.from_mlflow_signature(signature)
    if model_spec is not None:
        return specs_from_dicts(model_spec.get("inputs")), specs_from_dicts(model_spec.get("outputs"))
    return None


def _copy_library(model: str | os.PathLike, directory: Path) -> str:
    source = Path(model)
    if not source.is_file():
        raise ModelNotFoundError(f"TVM library not found: {source}")
    if source.suffix not in (".so", ".tar", ".dylib", ".dll"):
        raise InvalidInputError(f"{source}: expected a library from export_library (.so or .tar)")
    name = f"model{source.suffix}"
    shutil.copyfile(source, directory / name)
    return name


def _export(model: Any, directory: Path, params: Mapping[str, Any] | None, target: Any, cc: str | None):
    """Compile an IRModule (or take an executable), export it; return (file, IR spec or None, target JSON)."""
    from arachne_mlflow.runtime.tvm import import_tvm

    tvm = import_tvm()
    target = _tvm_target(tvm, target)
    ir_specs = None
    if isinstance(model, tvm.IRModule):
        ir_specs, weight_names = _relax_specs(model)
        if weight_names:
            missing = [n for n in weight_names if n not in (params or {})]
            if missing:
                raise InvalidInputError(
                    f"the IRModule's main takes weights {weight_names}: pass params= (missing {missing})"
                )
            _save_params({n: params[n] for n in weight_names}, directory / PARAMS_FILE)
        try:
            model = tvm.compile(model, target=target)
        except Exception as err:  # TVM raises TVMError and friends for what it cannot compile
            raise InvalidInputError(f"tvm.compile for target {str(target)!r} failed: {err}") from err
    if not hasattr(model, "export_library"):
        raise InvalidInputError(
            f"a TVM model is a library path, a Relax executable or an IRModule, got {type(model).__name__}"
        )
    _link(model, directory / "model.so", _target_triple(str(target)), cc)
    return "model.so", ir_specs, str(target)


def _tvm_target(tvm: Any, target: Any) -> Any:
    """A `tvm.target.Target` from any form the caller gives (`tvm.compile` fails on a plain dict)."""
    if isinstance(target, tvm.target.Target):
        return target
    try:
        return tvm.target.Target(dict(target) if isinstance(target, Mapping) else target)
    except Exception as err:  # TVM raises ValueError/TVMError for a target it does not know
        raise InvalidInputError(
            f"bad TVM target {target!r}: give a kind ('llvm'), its JSON form or a dict such as "
            f'{{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}} ({err})'
        ) from err


def _link(executable: Any, library: Path, triple: str | None, cc: str | None) -> None:
    """`export_library` with the compiler for the target's CPU; a failure says what to install or pass."""
    foreign = triple is not None and normalize_arch(_triple_cpu(triple)) != machine_arch()
    compiler = cc or (_cross_compiler(triple) if foreign else None)
    try:
        executable.export_library(str(library), **({"cc": compiler} if compiler else {}))
    except (RuntimeError, OSError) as err:  # tvm.support.cc raises RuntimeError; a missing compiler OSError
        from tvm.support.cc import get_cc

        if cc is not None:
            advice = "pass a cc= that is installed and links for the target's CPU"
        elif foreign:
            debian = _debian_triple(triple)
            advice = (
                f"install a cross compiler for {triple} (Debian/Ubuntu: apt-get install gcc-{debian}, with its "
                f"recommended C library; it provides {debian}-gcc) or pass cc= naming one"
            )
        else:
            advice = "install a C compiler (apt-get install gcc) or pass cc="
        cpu = triple if foreign else machine_arch()
        raise InvalidInputError(
            f"linking the TVM library for {cpu} with {compiler or get_cc()} failed ({_linker_error(err)}): {advice}"
        ) from err


def _linker_error(err: Exception) -> str:
    """The line of a compiler's output that says what went wrong (TVM wraps it in lines of its own)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Compilation error", "Command line"))]
    errors = [line for line in lines if ("error" in line or "cannot" in line) and "returned" not in line]
    return (errors or lines[-1:] or [type(err).__name__])[0]


def _target_json(target: Any) -> str:
    """How MLmodel records a target given beside a library (TVM is not imported for it)."""
    return json.dumps(dict(target)) if isinstance(target, Mapping) else str(target)


def _target_triple(target: str | None) -> str | None:
    """The LLVM triple of a target as stored in MLmodel (its JSON form), or of its host for a GPU target."""
    if not target or not target.lstrip().startswith("{"):
        return None
    conf = json.loads(target)
    host = conf.get("host")
    return conf.get("mtriple") or (host.get("mtriple") if isinstance(host, dict) else None)


def _triple_cpu(triple: str | None) -> str | None:
    return triple.split("-", 1)[0] if triple else None


def _debian_triple(triple: str) -> str:
    """`aarch64-unknown-linux-gnu` as Debian names it (`aarch64-linux-gnu`): without the vendor."""
    parts = triple.split("-")
    return "-".join([parts[0], *parts[2:]]) if len(parts) == 4 else triple


def _cross_compiler(triple: str | None) -> str | None:
    """An installed `<triple>-gcc` (or `-g++`), under the triple as given or as Debian names it."""
    for prefix in dict.fromkeys((triple, _debian_triple(triple))):
        for suffix in ("gcc", "g++"):
            if shutil.which(f"{prefix}-{suffix}"):
                return f"{prefix}-{suffix}"
    return None


def _relax_specs(mod: Any):
    """The inputs (name, dtype, shape) and outputs of a Relax module's `main`, and its weight names."""
    func = mod["main"]
    n_inputs = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    inputs = [_tensor_spec(p.name, p.ty) for p in func.params[:n_inputs]]
    ret = func.ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    outputs = [_tensor_spec(f"output_{i}", ty) for i, ty in enumerate(fields)]
    return (inputs, outputs), [p.name for p in func.params[n_inputs:]]


def _tensor_spec(name: str, ty: Any) -> TensorSpec:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(ty, "dtype"):
        raise InvalidInputError(f"Relax main: {name!r} is not a tensor of known rank ({ty}); pass signature=")
    return TensorSpec.create(name, str(ty.dtype), [int(d.value) if hasattr(d, "value") else -1 for d in shape])


def _read_params(file: str | os.PathLike) -> dict[str, Any]:
    from arachne_mlflow.runtime.tvm import import_tvm

    if not Path(file).is_file():
        raise ModelNotFoundError(f"params file not found: {file}")
    return dict(import_tvm().runtime.load_param_dict_from_file(str(file)))


def _save_params(params: Mapping[str, Any], file: Path) -> None:
    from arachne_mlflow.runtime.tvm import import_tvm

    tvm = import_tvm()
    tensors = {
        name: value if hasattr(value, "numpy") else tvm.runtime.tensor(np.asarray(value))
        for name, value in params.items()
    }
    tvm.runtime.save_param_dict_to_file(tensors, str(file))
