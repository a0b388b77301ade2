"""A following device's side of a staged pull rollout (protocol/staged_pull.py): which version it runs now,
and how long it waits before it downloads one.

The alias lookup carries the version's tags, so a device learns whether it is admitted from the one
answer it fetches anyway. Only a device that must go to (or back to) the rollout's `from` version and
does not run it asks for that version; every other poll stays one alias lookup.
"""

from __future__ import annotations

import threading

from arachne_mlflow.protocol.staged_pull import spread_fraction, wanted_version
from arachne_mlflow.server.pull.registry_client import ModelRef, ModelVersion, RegistryClient


def staged_version(
    mv: ModelVersion, ref: ModelRef, device: str, running: str | None, registry: RegistryClient
) -> ModelVersion | None:
    """The version `device` runs now when `ref` names `mv`: `mv` itself, or a staged rollout's `from`
    version (fetched only when the device does not run it); None while the device is not admitted and
    the rollout has no version to keep (it keeps what it has). Raises the registry's errors."""
    wanted = wanted_version(mv.version, mv.tags, ref.alias, ref.registered_model, device)
    if wanted is None or wanted == mv.version:
        return None if wanted is None else mv
    if wanted == running:
        return ModelVersion(mv.name, wanted, "READY")
    return registry.get_version(ref.registered_model, wanted)


def wait_spread(device: str, window: float, stop: threading.Event) -> bool:
    """Wait this device's share of the spread `window` (seconds) before a download, so that the devices
    a wave admits do not all download in the same second; False when the follower stopped meanwhile."""
    return window <= 0 or not stop.wait(spread_fraction(device) * window)
