"""A staged pull rollout under way, as `fleet sync` and `fleet status` see it (the host's reading of
protocol/staged_pull.py's tag).

While the version a deployment's alias names carries a rollout tag for that alias, the alias alone
does not say what each device should run: a device runs the new version once admitted, the `from`
version until then (or under a halted tag). `fleet pull-rollout` drives the waves and records the
desired state when they are done, so `fleet sync` pushes and records nothing meanwhile (the registry
would say a version the fleet does not run yet), and `fleet status` compares each device with the
version the tag gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arachne_mlflow.deployments.source import REGISTRY_PREFIX
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.protocol.staged_pull import ROLLING, ROLLOUT_TAG, RolloutTag, admitted


@dataclass(frozen=True)
class StagedRollout:
    """The tag on the alias's version, with how many of the deployment's devices it admits."""

    registered_model: str
    alias: str
    version: str  # the version the alias names (the one rolled out)
    from_version: str | None  # what the devices not admitted run (None: each keeps what it has)
    state: str  # rolling | halted
    wave: int
    admit: float
    admitted: int  # of the deployment's devices
    devices: int

    def wanted(self, device: str) -> str | None:
        """The version `device` should run under the tag (None: whatever version it has)."""
        tag = RolloutTag(self.alias, self.from_version, self.admit, self.wave, self.state)
        return self.version if admitted(tag, self.registered_model, device) else self.from_version

    def describe(self) -> str:
        origin = f" (from v{self.from_version})" if self.from_version else ""
        rollout = f"staged pull rollout of v{self.version}{origin}"
        if self.state == ROLLING:
            return (
                f"{rollout} in progress: wave {self.wave}, {self.admitted} of {self.devices} devices admitted; "
                "`fleet pull-rollout` goes on with it"
            )
        keep = f"every device on v{self.from_version}" if self.from_version else "each device on its version"
        keep = f"the tag keeps {keep}"
        again = "`fleet pull-rollout` starts it again"
        return f"{rollout} halted: {keep}, though {self.alias} names v{self.version}; {again}"


def staged_rollout(model_uri: str, client: Any, devices: Sequence[Device]) -> StagedRollout | None:
    """The staged pull rollout of the alias `model_uri` names (`models:/NAME@ALIAS`), read off the version
    the alias names now; None for any other URI, or where that version has no tag of this alias's
    rollout (none yet, a finished one, one from that very version). MLflow's errors pass."""
    named = _alias(model_uri)
    if named is None:
        return None
    name, alias = named
    current = client.get_model_version_by_alias(name, alias)
    version, tag = str(current.version), RolloutTag.parse((current.tags or {}).get(ROLLOUT_TAG))
    if tag is None or tag.alias != alias or tag.from_version == version:
        return None
    count = sum(admitted(tag, name, str(device)) for device in devices)
    return StagedRollout(name, alias, version, tag.from_version, tag.state, tag.wave, tag.admit, count, len(devices))


def _alias(model_uri: str) -> tuple[str, str] | None:
    """(registered model, alias) of `models:/NAME@ALIAS`; None for any other URI."""
    if not model_uri.startswith(REGISTRY_PREFIX):
        return None
    path = model_uri[len(REGISTRY_PREFIX) :].strip("/")
    if "/" in path or "@" not in path:
        return None
    name, alias = path.rsplit("@", 1)
    return (name, alias) if name and alias else None
