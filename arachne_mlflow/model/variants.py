"""Which variant of a model a device can run: the one reader of a model's variants list.

A model may hold several builds of one network (MLmodel `arachne.variants`, docs/flavors.md);
a device runs the first one, in the model's order, whose requirements it meets. What a device
offers is described the way `GET /v2` reports it:

    {"arch": "aarch64",
     "runtimes": [{"name": "onnx", "version": "1.20.1", "providers": ["CPUExecutionProvider"]},
                  {"name": "tvm", "version": "0.21.0", "devices": ["cpu", "cuda"]}]}

`choose_variant` is pure (no network, no DNN library, no MLflow), so the host choosing for a
device and the device choosing for itself give the same answer. `this_machine` describes the
machine it runs on in that shape, asking a DNN library only for the facts a variant needs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arachne_mlflow.errors import IncompatibleModelError
from arachne_mlflow.model.arch import machine_arch, normalize_arch

if TYPE_CHECKING:
    from arachne_mlflow.model.directory import ArachneModel

#: The keys of a variant's `requires` block.
REQUIRES_KEYS = ("arch", "runtime", "providers", "tvm_devices", "min_version")
#: TVM device kinds asked about when a variant needs one other than the CPU.
TVM_DEVICE_KINDS = ("cpu", "cuda", "rocm", "opencl", "vulkan", "metal")
ASK_TIMEOUT = 120.0
#: The runtime registry's entry-point group (runtime/registry.py), for plugins.
ENTRY_POINT_GROUP = "arachne_mlflow.runtimes"
_MODULES = {"onnx": ("onnxruntime",), "tvm": ("tvm",), "tflite": ("ai_edge_litert", "tflite_runtime", "tensorflow")}
_DISTRIBUTIONS = {
    "onnx": ("onnxruntime", "onnxruntime-gpu"),
    "tvm": ("apache-tvm", "tvm"),
    "tflite": ("ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu"),
}
_ASK_PROVIDERS = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
_ASK_TVM_DEVICES = "import json, sys, tvm; print(json.dumps([k for k in sys.argv[1:] if tvm.runtime.device(k).exist]))"


@dataclass
class VariantChoice:
    """The variant chosen for a device, or None and why each variant cannot run there."""

    variant: ArachneModel | None
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def explain(self) -> str:
        """One line per variant that cannot run, saying why."""
        return "; ".join(f"variant {name!r}: {', '.join(why)}" for name, why in self.reasons.items())

    def required(self, where: str = "this machine") -> ArachneModel:
        """The chosen variant; `IncompatibleModelError` with every variant's reasons when none runs."""
        if self.variant is None:
            raise IncompatibleModelError(f"no variant of the model can run on {where}: {self.explain()}")
        return self.variant


def choose_variant(
    variants: Sequence[ArachneModel], device: Mapping[str, Any], order: Iterable[str] | None = None
) -> VariantChoice:
    """The first of `variants` (or in `order`, a list of names) that `device` can run, with the
    reasons the ones before it (or all, when none) cannot."""
    by_name = {v.variant_name: v for v in variants}
    names = list(order) if order is not None else list(by_name)
    reasons: dict[str, list[str]] = {}
    for name in names:
        variant = by_name.get(name)
        if variant is None:
            reasons[name] = [f"the model has no such variant (it has {sorted(by_name)})"]
            continue
        unmet = unmet_requirements(variant, device)
        if not unmet:
            return VariantChoice(variant, reasons)
        reasons[name] = unmet
    return VariantChoice(None, reasons)


def requirements(variant: ArachneModel) -> dict[str, Any]:
    """What `variant` needs of a device: its `requires` block, plus its runtime and (TVM) its CPU and device."""
    needs = dict(variant.requires)
    needs.setdefault("runtime", variant.runtime)
    if variant.runtime == "tvm":
        if variant.tvm.get("arch") and "arch" not in needs:
            needs["arch"] = [variant.tvm["arch"]]
        device = variant.tvm.get("device", "cpu")
        if device != "cpu":
            needs["tvm_devices"] = sorted({*needs.get("tvm_devices", []), device})
    return needs


def unmet_requirements(variant: ArachneModel, device: Mapping[str, Any]) -> list[str]:
    """Why `device` cannot run `variant` (empty: it can). A fact the device did not report counts as unmet."""
    needs = requirements(variant)
    why = []
    if needs.get("arch"):
        arch = device.get("arch")
        wanted = [normalize_arch(a) for a in needs["arch"]]
        if arch is None or normalize_arch(arch) not in wanted:
            why.append(f"needs CPU {' or '.join(wanted)}, the device is {arch or 'unreported'}")
    runtimes = {r.get("name"): r for r in device.get("runtimes") or [] if isinstance(r, Mapping)}
    entry = runtimes.get(needs["runtime"])
    if entry is None:
        return [*why, f"needs the {needs['runtime']!r} runtime, the device has {sorted(map(str, runtimes))}"]
    why += _missing("onnxruntime provider", needs.get("providers"), entry.get("providers"))
    why += _missing("TVM device", needs.get("tvm_devices"), entry.get("devices"))
    if needs.get("min_version"):
        have = entry.get("version")
        if have is None or _version_key(have) < _version_key(needs["min_version"]):
            why.append(
                f"needs {needs['runtime']} {needs['min_version']} or later, the device has {have or 'unreported'}"
            )
    return why


def _missing(what: str, wanted: list[str] | None, have: list[str] | None) -> list[str]:
    if not wanted:
        return []
    if have is None:
        return [f"needs {what} {', '.join(wanted)}, the device did not report its {what}s"]
    absent = [name for name in wanted if name not in have]
    return [f"needs {what} {', '.join(absent)}, the device has {sorted(have)}"] if absent else []


def _version_key(version: Any) -> tuple[int, ...]:
    """`1.20.1rc1` -> (1, 20, 1): the leading numbers of each dotted part."""
    parts = []
    for part in str(version).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


# -- this machine -------------------------------------------------------------------------
def this_machine(variants: Sequence[ArachneModel] = ()) -> dict[str, Any]:
    """This machine in `GET /v2`'s shape; onnxruntime's providers and TVM's devices are asked
    (in a child process, unless the library is loaded here) only when one of `variants` needs them."""
    needs = [requirements(v) for v in variants]
    report: dict[str, Any] = {"arch": machine_arch(), "runtimes": []}
    for name in _runtime_names():
        modules = _MODULES.get(name)
        if modules is not None and not any(importlib.util.find_spec(m) for m in modules):
            continue
        entry: dict[str, Any] = {"name": name, "version": _installed_version(name)}
        if name == "onnx" and any(n["runtime"] == "onnx" and n.get("providers") for n in needs):
            entry["providers"] = _ask("onnxruntime", "providers", _ASK_PROVIDERS)
        if name == "tvm" and any(n["runtime"] == "tvm" and n.get("tvm_devices") for n in needs):
            entry["devices"] = _ask("tvm", "devices", _ASK_TVM_DEVICES, *TVM_DEVICE_KINDS)
        report["runtimes"].append(entry)
    return report


def _runtime_names() -> list[str]:
    """The built-in runtimes and the plugins: entry points, and those registered in this process
    when the runtime registry is loaded (this layer does not import it)."""
    from importlib.metadata import entry_points

    names = [*_MODULES, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))]
    registry = sys.modules.get("arachne_mlflow.runtime.registry")
    if registry is not None:
        names += registry.list_runtimes()
    return list(dict.fromkeys(names))


def _installed_version(runtime: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in _DISTRIBUTIONS.get(runtime, ()):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


_asked: dict[str, list[str] | None] = {}


def _ask(module: str, what: str, code: str, *args: str) -> list[str] | None:
    """onnxruntime's providers or TVM's devices (None: the library could not say), asked once per
    process: of the library when it is loaded here, else of a child (a DNN library costs the
    server tens of MB, and a broken build must not take it down)."""
    if what in _asked:
        return _asked[what]
    loaded = sys.modules.get(module)
    if loaded is not None and what == "providers":
        found: Any = list(loaded.get_available_providers())
    elif loaded is not None:
        found = [kind for kind in args if loaded.runtime.device(kind).exist]
    else:
        try:
            result = subprocess.run(
                [sys.executable, "-c", code, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=ASK_TIMEOUT,
            )
            found = json.loads(result.stdout) if result.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            found = None
    _asked[what] = found if isinstance(found, list) else None
    return _asked[what]
