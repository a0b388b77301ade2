"""The vocabulary of a fleet command's results: a device's state after it, and `DeviceResult`.

Rollouts, rollbacks, the registry's record and the reports all speak it (converge.py makes most results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arachne_mlflow.fleet.device import Device

DEPLOYED, UNCHANGED, FAILED, DELETED, ABSENT = "deployed", "unchanged", "failed", "deleted", "absent"
ROLLED_BACK, UNTOUCHED = "rolled-back", "untouched"  # (rollout.py, rollback.py)
NEVER_HAD, FORGOTTEN = "never-had-it", "forgotten"  # delete: nothing to clean (the registry's ledger), or -C forget
PULLING = "pulling"  # a device that follows the model's registry URI itself (serve --follow): nothing pushed
UNKNOWN = "?"  # the label of what a device runs when it could not be asked


@dataclass
class DeviceResult:
    """What one command did to one device: before and after (version labels), state, time, error."""

    device: Device
    state: str
    before: str = UNKNOWN
    after: str = UNKNOWN
    seconds: float = 0.0
    error: str | None = None
    revision: int | None = None
    runtime: str | None = None  # of the model on the device, when it was asked
    provenance: dict[str, Any] | None = None
    variant: str | None = None  # of a model with variants: the one the device runs (or was sent)
    undone: bool = False  # a halted rollout rolled it back: it does not have what the command wanted

    @property
    def ok(self) -> bool:
        return self.state not in (FAILED, UNTOUCHED) and not self.undone


def version_label(record: dict[str, Any] | None, registered_model: str | None = None) -> str:
    """What a device holds, shortly: `-` (nothing), `v3` (a version of `registered_model`),
    `other-model v2`, or the first characters of the files' digest (no registry)."""
    if record is None:
        return "-"
    provenance = record.get("provenance") or {}
    if provenance.get("version") is not None:
        model = provenance.get("registered_model")
        prefix = "" if registered_model is None or model == registered_model else f"{model} "
        return f"{prefix}v{provenance['version']}"
    return str(record.get("digest", UNKNOWN)).split(":")[-1][:10]
