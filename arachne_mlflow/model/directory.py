"""The one reader of an MLflow model directory's `arachne` flavor, used by pyfunc, flavors and server.

It reads `MLmodel` with PyYAML, so a device needs no MLflow to load a model:

    arachne:
      runtime: tflite | onnx | tvm
      model_file: model.tflite          # relative to the model dir
      runtime_options: {num_threads: 4} # passed to runtime.init
      tvm: {device: cpu, target: "...", arch: x86_64, params_file: params.bin}   # TVM only
      extra_files: [model.onnx.data]    # other files loading needs (optional)
      tensor_dtypes: {inputs: {x: bfloat16}, outputs: {y: bfloat16}}   # (optional, see below)
      batching: {max_batch_size: 16, max_queue_delay_microseconds: 500}   # dim 0 is a batch (optional, see
                                                                          # model/batching.py)
      capture: {rate: 0.01, per_hour: 100}   # field samples the device keeps (optional, model/capture_rules.py)
      arachne_mlflow_version: "..."

A model may instead hold several builds of one network (`variants`, see model/variants.py and
docs/flavors.md): each lists its own runtime, files, options, `requires`, `tolerance` and the
`check` made when it was logged; the signature, `tensor_dtypes` and `batching` are the model's.
The keys above then describe the reference (first) variant, for readers older than variants.
`read_model_dir` returns the variant this machine (or `device`) runs first, as an `ArachneModel`
whose `variants` lists them all; a model without variants is a one-variant model.

The tensor spec comes from MLflow's `signature` (tensor-based), stored beside it in MLmodel.

MLmodel comes from whoever uploads a model to a device server, so it is read within bounds: at
most `MAX_MLMODEL_BYTES`, nested at most `MAX_YAML_DEPTH` deep and at most `MAX_YAML_NODES`
values, both counted with YAML aliases expanded. MLflow writes aliases (for objects that two
flavors share), so they are allowed; but a few hundred bytes of nested aliases expand to
billions of nodes for any code that walks the result, and that is refused while it is parsed.

MLflow reads a signature dtype with `np.dtype(name)`, which knows `bfloat16` only once ml_dtypes
is imported: so a bfloat16 tensor is float32 in the signature (what MLflow's tools feed and get,
the pyfunc casting at its edge), and its true dtype is in `tensor_dtypes`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml

from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.arch import machine_arch, normalize_arch
from arachne_mlflow.model.capture_rules import CaptureRules, parse_rules
from arachne_mlflow.model.spec import BFLOAT16, TensorSpec
from arachne_mlflow.model.variants import REQUIRES_KEYS, VariantChoice, choose_variant, this_machine

FLAVOR_NAME = "arachne"
MLMODEL = "MLmodel"
# Files MLflow writes beside a model that a device may want (environment descriptions).
ENVIRONMENT_FILES = ("requirements.txt", "python_env.yaml", "conda.yaml")
MAX_MLMODEL_BYTES = 1024**2
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
MAX_VARIANTS = 16
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The keys of a variant's `tolerance` (agreement with the reference variant, checked when logged).
TOLERANCE_KEYS = ("atol", "rtol", "top1")


@dataclass
class ArachneModel:
    """An MLflow model directory with an `arachne` flavor, ready to load with the runtime."""

    path: Path
    runtime: str
    model_file: str
    runtime_options: dict[str, Any] = field(default_factory=dict)
    tvm: dict[str, Any] = field(default_factory=dict)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    batching: dict[str, Any] | None = None
    #: Which field samples a device keeps (None: capture off), from `arachne.capture`.
    capture: CaptureRules | None = None
    version: str | None = None
    mlmodel: dict[str, Any] = field(default_factory=dict)
    #: The variant these fields describe (a model without variants: its runtime's name).
    variant_name: str = ""
    #: Whether MLmodel lists variants (False: the single block of a model saved before them).
    has_variants: bool = False
    #: Every variant, in the model's order (a model without variants: itself).
    variants: list[ArachneModel] = field(default_factory=list, repr=False)
    requires: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)
    #: What was measured against the reference variant when the model was logged.
    check: dict[str, Any] = field(default_factory=dict)
    #: Set when no variant runs here: why each cannot (these fields then describe the first).
    choice: VariantChoice | None = field(default=None, repr=False)

    @property
    def model_spec(self) -> dict[str, Any] | None:
        """The tensor spec in the old env.yaml shape, or None when MLmodel has no signature."""
        if not self.inputs and not self.outputs:
            return None
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}

    def files(self) -> list[str]:
        """The files this model (this variant of it) consists of: MLmodel, what it names, its environment."""
        names = [MLMODEL, *self.variant_files()]
        names += [name for name in ENVIRONMENT_FILES if (self.path / name).is_file()]
        return names

    def variant_files(self) -> list[str]:
        """The files of this variant alone (relative paths): its model file, params and extra files."""
        names = [self.model_file, *self.extra_files]
        if self.tvm.get("params_file"):
            names.append(self.tvm["params_file"])
        return names

    def variant(self, name: str) -> ArachneModel:
        """The variant called `name`, with `variants` listing them all."""
        for view in self.variants:
            if view.variant_name == name:
                return replace(view, variants=self.variants)
        raise InvalidInputError(
            f"model {self.path.name!r} has no variant {name!r}: it has {[v.variant_name for v in self.variants]}"
        )

    def init_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for `runtime.init` that load this model."""
        kwargs: dict[str, Any] = {"runtime": self.runtime, "model_file": str(self.path / self.model_file)}
        kwargs.update(self.runtime_options)
        if self.runtime == "tvm":
            kwargs["model_spec"] = self.model_spec
            kwargs["tvm_device"] = self.tvm.get("device", "cpu")
            if self.tvm.get("params_file"):
                kwargs["params_file"] = str(self.path / self.tvm["params_file"])
        kwargs.update(overrides)
        return kwargs

    def check_compatible(self) -> None:
        """Raise `IncompatibleModelError` when this machine cannot run the model (no variant, TVM arch)."""
        if self.choice is not None:
            self.choice.required(f"this machine (model {self.path.name!r})")
        arch = self.tvm.get("arch")
        if self.runtime == "tvm" and arch and normalize_arch(arch) != machine_arch():
            raise IncompatibleModelError(
                f"model {self.path.name!r} was compiled by TVM for {arch} (target {self.tvm.get('target')!r}); "
                f"this machine is {machine_arch()}: compile it for this machine's CPU"
            )


def read_model_dir(
    path: str | os.PathLike,
    check_files: bool = True,
    variant: str | None = None,
    device: Mapping[str, Any] | None = None,
) -> ArachneModel:
    """Read `path/MLmodel`; raise a clear error if it is missing or has no `arachne` flavor.

    `check_files=False` reads MLmodel alone (a device that follows a registry reads it first to
    learn which files to download); every file name is still checked to stay inside the directory.
    Of a model with variants it returns `variant` (a name), else the first variant that `device`
    (default: this machine) can run and, with `check_files`, whose files are here.
    """
    path = Path(path)
    mlmodel_path = path / MLMODEL
    if not mlmodel_path.is_file():
        raise ModelNotFoundError(f"{path} is not an MLflow model directory: no {MLMODEL} file")
    mlmodel = _read_mlmodel(mlmodel_path)
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or FLAVOR_NAME not in flavors:
        names = sorted(flavors) if isinstance(flavors, dict) else []
        raise InvalidInputError(
            f"model at {path} has no '{FLAVOR_NAME}' flavor (its flavors: {names}); "
            "log it with arachne_mlflow.flavors.tflite / onnx / tvm"
        )
    conf = flavors[FLAVOR_NAME] or {}
    if not isinstance(conf, dict):
        raise InvalidInputError(f"{mlmodel_path}: the '{FLAVOR_NAME}' flavor must be a mapping")
    if not isinstance(conf.get("batching") or {}, dict):
        raise InvalidInputError(f"{mlmodel_path}: '{FLAVOR_NAME}.batching' must be a dict")
    try:
        inputs, outputs = parse_signature(mlmodel.get("signature"))
    except InvalidInputError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise InvalidInputError(f"{mlmodel_path}: 'signature' is not a list of tensor specs: {err}") from err
    dtypes = conf.get("tensor_dtypes") or {}
    if not isinstance(dtypes, dict):
        raise InvalidInputError(f"{mlmodel_path}: '{FLAVOR_NAME}.tensor_dtypes' must be a mapping")
    shared = ArachneModel(
        path=path,
        runtime="",
        model_file="",
        batching=dict(conf["batching"]) if conf.get("batching") is not None else None,
        capture=parse_rules(conf.get("capture"), f"{mlmodel_path}: '{FLAVOR_NAME}.capture'"),
        inputs=_with_dtypes(inputs, dtypes.get("inputs"), f"{mlmodel_path}: tensor_dtypes.inputs"),
        outputs=_with_dtypes(outputs, dtypes.get("outputs"), f"{mlmodel_path}: tensor_dtypes.outputs"),
        version=conf.get("arachne_mlflow_version"),
        mlmodel=mlmodel,
    )
    if "variants" in conf:
        views = _read_variants(conf["variants"], shared, mlmodel_path)
    else:
        views = [_read_variant(conf, shared, str(mlmodel_path), name=None)]
    model = _select(views, check_files, variant, device)
    if check_files and not (path / model.model_file).exists():
        raise ModelNotFoundError(f"model file {model.model_file!r} named in {mlmodel_path} is missing")
    return model


def _read_variants(blocks: Any, shared: ArachneModel, mlmodel_path: Path) -> list[ArachneModel]:
    where = f"{mlmodel_path}: '{FLAVOR_NAME}.variants'"
    if not isinstance(blocks, list) or not blocks or len(blocks) > MAX_VARIANTS:
        raise InvalidInputError(f"{where} must be a list of 1 to {MAX_VARIANTS} variants")
    views = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise InvalidInputError(f"{where}[{i}] must be a mapping")
        name = block.get("name")
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise InvalidInputError(f"{where}[{i}].name {name!r} must match {VARIANT_NAME.pattern}")
        if any(view.variant_name == name for view in views):
            raise InvalidInputError(f"{where}: two variants are called {name!r}")
        views.append(_read_variant(block, shared, f"{where}[{name}]", name=name))
    return views


def _read_variant(block: dict[str, Any], shared: ArachneModel, where: str, name: str | None) -> ArachneModel:
    """One variant's view: its own runtime, files and options over the model's signature and batching."""
    kinds = {"runtime_options": dict, "tvm": dict, "extra_files": list, "requires": dict, "tolerance": dict}
    for key, kind in (*kinds.items(), ("check", dict)):
        if not isinstance(block.get(key) or kind(), kind):
            raise InvalidInputError(f"{where}: '{FLAVOR_NAME}.{key}' must be a {kind.__name__}")
    for key in ("runtime", "model_file"):
        if not isinstance(block.get(key), str):
            raise InvalidInputError(f"{where}: the '{FLAVOR_NAME}' flavor lacks '{key}'")
    mlmodel_path = shared.path / MLMODEL
    tvm = dict(block.get("tvm") or {})
    if tvm.get("params_file"):
        tvm["params_file"] = _relative_name(tvm["params_file"], mlmodel_path)
    return replace(
        shared,
        runtime=block["runtime"],
        model_file=_relative_name(block["model_file"], mlmodel_path),
        runtime_options=dict(block.get("runtime_options") or {}),
        tvm=tvm,
        extra_files=[_relative_name(n, mlmodel_path) for n in block.get("extra_files") or []],
        variant_name=name or block["runtime"],
        has_variants=name is not None,
        requires=checked_requires(block.get("requires") or {}, where),
        tolerance=checked_tolerance(block.get("tolerance") or {}, where),
        check=dict(block.get("check") or {}),
    )


def checked_requires(requires: dict[str, Any], where: str) -> dict[str, Any]:
    """A variant's `requires` block, its lists of names as lists (a single name is a list of one)."""
    unknown = sorted(set(requires) - set(REQUIRES_KEYS))
    if unknown:
        raise InvalidInputError(f"{where}: unknown 'requires' keys {unknown}: use {list(REQUIRES_KEYS)}")
    checked = dict(requires)
    for key in ("arch", "providers", "tvm_devices"):
        value = checked.get(key)
        if isinstance(value, str):
            checked[key] = value = [value]
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InvalidInputError(f"{where}: 'requires.{key}' must be a list of names")
    for key in ("runtime", "min_version"):
        if checked.get(key) is not None and not isinstance(checked[key], (str, int, float)):
            raise InvalidInputError(f"{where}: 'requires.{key}' must be a string")
        if checked.get(key) is not None:
            checked[key] = str(checked[key])
    return checked


def checked_tolerance(tolerance: dict[str, Any], where: str) -> dict[str, float]:
    """A variant's `tolerance` block: known keys, numbers >= 0, `top1` a fraction."""
    unknown = sorted(set(tolerance) - set(TOLERANCE_KEYS))
    if unknown:
        raise InvalidInputError(f"{where}: unknown 'tolerance' keys {unknown}: use {list(TOLERANCE_KEYS)}")
    for key, value in tolerance.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidInputError(f"{where}: 'tolerance.{key}' must be a number >= 0, got {value!r}")
    if tolerance.get("top1", 0) > 1:
        raise InvalidInputError(f"{where}: 'tolerance.top1' is a fraction of rows, at most 1")
    return {key: float(value) for key, value in tolerance.items()}


def _select(
    views: list[ArachneModel], check_files: bool, name: str | None, device: Mapping[str, Any] | None
) -> ArachneModel:
    """The named variant, or the first that runs on `device` (and whose files are here); each listing all."""
    top = replace(views[0], variants=views)
    if name is not None:
        return top.variant(name)
    if len(views) == 1 and not views[0].has_variants:
        return top
    present = [v for v in views if all((v.path / f).exists() for f in v.variant_files())] if check_files else views
    if not present:
        raise ModelNotFoundError(
            f"{views[0].path}: none of the variants' files are here: {[v.variant_name for v in views]}"
        )
    choice = choose_variant(present, this_machine(present) if device is None else device)
    here = {v.variant_name for v in present}
    choice.reasons.update(
        {v.variant_name: ["its files are not in the model directory"] for v in views if v.variant_name not in here}
    )
    if choice.variant is None:
        return replace(present[0], variants=views, choice=choice)
    return replace(choice.variant, variants=views)


def _read_mlmodel(path: Path) -> Any:
    """MLmodel's YAML, refused when it is too big, too deep or expands (through aliases) to too many values."""
    with open(path, "rb") as file:
        text = file.read(MAX_MLMODEL_BYTES + 1)
    if len(text) > MAX_MLMODEL_BYTES:
        raise InvalidInputError(f"{path}: larger than {MAX_MLMODEL_BYTES} bytes; an MLmodel file is a few kilobytes")
    try:
        return yaml.load(text.decode("utf-8"), Loader=_BoundedLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path}: not valid YAML: {err}") from err


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents that nest deeper than `MAX_YAML_DEPTH` or hold more
    than `MAX_YAML_NODES` values, with aliases counted as the nodes they stand for."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_YAML_DEPTH:  # before composing further: the composer itself recurses
            raise self._refusal(f"nested deeper than {MAX_YAML_DEPTH} levels")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._expanded:  # an alias returns a node already counted
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            counts = [self._expanded[id(child)] for child in children]
            values = 1 + sum(count for count, _ in counts)
            height = 1 + max((h for _, h in counts), default=0)
            if values > MAX_YAML_NODES or height > MAX_YAML_DEPTH:
                raise self._refusal(
                    f"more than {MAX_YAML_NODES} values or {MAX_YAML_DEPTH} levels once its aliases are expanded"
                )
            self._expanded[id(node)] = (values, height)
        return node

    def _refusal(self, why: str) -> yaml.YAMLError:
        return yaml.composer.ComposerError(None, None, why, self.peek_event().start_mark)


#: The dtypes `tensor_dtypes` may give a tensor (MLflow's signature has float32 for them).
_SIGNATURE_STAND_INS = {BFLOAT16: np.dtype(np.float32)}


def mlflow_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype MLflow's signature gives a tensor: the dtype itself, or a stand-in MLflow can read back."""
    return _SIGNATURE_STAND_INS.get(dtype, dtype)


def tensor_dtypes(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, dict[str, str]]:
    """The `tensor_dtypes` block of the tensors whose signature dtype is a stand-in (empty if none)."""
    block = {}
    for side, specs in (("inputs", inputs), ("outputs", outputs)):
        names = {s.name: s.dtype.name for s in specs if s.dtype in _SIGNATURE_STAND_INS}
        if names:
            block[side] = names
    return block


def _with_dtypes(specs: list[TensorSpec], dtypes: Any, where: str) -> list[TensorSpec]:
    if not dtypes:
        return specs
    if not isinstance(dtypes, dict):
        raise InvalidInputError(f"{where} must be a mapping of tensor names to dtypes")
    allowed = {dtype.name: dtype for dtype in _SIGNATURE_STAND_INS}
    by_name = {s.name: s for s in specs}
    for name, dtype in dtypes.items():
        if name not in by_name or dtype not in allowed:
            raise InvalidInputError(
                f"{where}: {name!r}: {dtype!r} must name a tensor of the signature and one of {sorted(allowed)}"
            )
        by_name[name] = TensorSpec(name, allowed[dtype], by_name[name].shape)
    return [by_name[s.name] for s in specs]


def parse_signature(signature: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """TensorSpecs from MLmodel's `signature` (JSON strings of tensor specs); empty if absent."""
    if not isinstance(signature, dict):
        return [], []
    return _parse_schema(signature.get("inputs")), _parse_schema(signature.get("outputs"))


def _parse_schema(text: Any) -> list[TensorSpec]:
    if not text:
        return []
    items = json.loads(text) if isinstance(text, str) else text
    specs = []
    for i, item in enumerate(items):
        if item.get("type") != "tensor":
            raise InvalidInputError(f"MLmodel signature entry {item!r} is not a tensor spec")
        tensor = item["tensor-spec"]
        specs.append(TensorSpec.create(item.get("name") or f"input_{i}", tensor["dtype"], tensor["shape"]))
    return specs


def _relative_name(name: str, mlmodel_path: Path) -> str:
    """A file name from MLmodel must stay inside the model directory."""
    if not isinstance(name, str):
        raise InvalidInputError(f"{mlmodel_path}: file name {name!r} is not a string")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise InvalidInputError(f"{mlmodel_path}: file name {name!r} leaves the model directory")
    return str(pure)
