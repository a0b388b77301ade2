"""The kind of a device: what makes two devices run a model the same way.

Two devices are of one kind when `GET /v2` reports the same CPU architecture and the same
runtimes (library, version, onnxruntime providers, TVM devices). Profiles are measured once per
kind and recorded under its `key`, so that choosing a variant for a device later (from what it
reports) finds the figures measured on its kind. Pure: no network, no DNN library, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.model.arch import normalize_arch

#: The facts of a runtime entry that make a kind (others, such as errors, do not).
RUNTIME_FACTS = ("name", "library", "version", "providers", "devices")


@dataclass(frozen=True)
class DeviceKind:
    """`key`: a short stable name for the kind (`x86_64-3f2a9c1b`); `facts`: what it stands for."""

    key: str
    facts: dict[str, Any]

    @property
    def label(self) -> str:
        """`x86_64 onnx 1.23.2, tvm 0.27.0`: the kind in words, for tables."""
        runtimes = ", ".join(f"{r['name']} {r.get('version') or '?'}" for r in self.facts["runtimes"])
        return f"{self.facts['arch']} {runtimes}".strip()


def device_kind(metadata: Mapping[str, Any]) -> DeviceKind:
    """The kind of the device whose `GET /v2` answer is `metadata`."""
    arch = metadata.get("arch")
    arch = normalize_arch(arch) if isinstance(arch, str) and arch else "unknown"
    runtimes = []
    for entry in metadata.get("runtimes") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        facts = {key: _plain(entry.get(key)) for key in RUNTIME_FACTS if entry.get(key) is not None}
        runtimes.append(facts)
    runtimes.sort(key=lambda r: r["name"])
    facts = {"arch": arch, "runtimes": runtimes}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:8]
    return DeviceKind(f"{arch}-{digest}", facts)


def _plain(value: Any) -> Any:
    """Lists sorted (a provider list's order is not a different kind), the rest as strings."""
    if isinstance(value, (list, tuple)):
        return sorted(str(v) for v in value)
    return str(value)
