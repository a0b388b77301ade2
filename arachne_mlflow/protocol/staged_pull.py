"""A staged pull rollout as both ends read it: the rollout tag on a model version, and each device's place.

    model version tag  arachne.rollout  {"alias": "prod", "from": "3", "admit": 0.0625, "wave": 1,
                                         "state": "rolling" | "halted"}

The host (deployments/pull_rollout.py) writes the tag on the new version before it moves the alias,
then raises `admit` wave by wave. A device that follows that alias and finds the tag on the version
the alias names runs the new version only where its `position` is below `admit`, and the `from`
version otherwise (or under a halted rollout). A device's position is a stable number in [0, 1) from
the registered model's name and its own, so the host orders the fleet exactly as the devices place
themselves, and the tag stays the same few bytes whatever the fleet's size: a poll stays one small
alias lookup. `spread_fraction` places a device in the window over which its downloads are spread.
This module imports no MLflow: devices use it too.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.protocol import bounded_json

ROLLOUT_TAG = "arachne.rollout"
ROLLING, HALTED = "rolling", "halted"
MAX_TAG_CHARS = 1000  # what the host writes is under 200 characters; anything longer is not read
MAX_VERSION_DIGITS = 18


def _unit(*parts: str) -> float:
    """A number in [0, 1) from `parts`, the same on every machine (sha256, its first 64 bits)."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def position(registered_model: str, device: str) -> float:
    """Where `device` stands in a staged rollout of `registered_model`: it is admitted once `admit` passes it."""
    return _unit("arachne.rollout", registered_model, device)


def spread_fraction(device: str) -> float:
    """The fraction of the spread window a device waits before it downloads a new version (its own
    hash, unrelated to its rollout position, so a wave's devices do not download in the same order)."""
    return _unit("arachne.spread", device)


@dataclass(frozen=True)
class RolloutTag:
    """The tag's content: which alias it stages, the version devices not admitted keep, the threshold."""

    alias: str
    from_version: str | None
    admit: float
    wave: int = 0
    state: str = ROLLING

    def to_json(self) -> str:
        body = {"alias": self.alias, "from": self.from_version, "admit": self.admit, "wave": self.wave}
        return json.dumps({**body, "state": self.state}, sort_keys=True)

    @classmethod
    def parse(cls, value: str | None) -> RolloutTag | None:
        """The tag in `value`; None where there is none or it is not one this module wrote (then it is
        ignored and the alias is followed as it is)."""
        if not value or len(value) > MAX_TAG_CHARS:
            return None
        try:
            body = bounded_json.loads(value, "a rollout tag", max_bytes=MAX_TAG_CHARS, max_containers=1, max_depth=1)
        except InvalidInputError:
            return None
        if not isinstance(body, dict):
            return None
        alias, origin, admit = body.get("alias"), body.get("from"), body.get("admit")
        wave, state = body.get("wave", 0), body.get("state")
        if not isinstance(alias, str) or not alias or state not in (ROLLING, HALTED):
            return None
        if origin is not None and not (isinstance(origin, str) and _is_version(origin)):
            return None
        if isinstance(admit, bool) or not isinstance(admit, (int, float)) or not 0 <= admit <= 1:
            return None
        if isinstance(wave, bool) or not isinstance(wave, int) or wave < 0:
            return None
        return cls(alias, origin, float(admit), wave, state)


def admitted(tag: RolloutTag, registered_model: str, device: str) -> bool:
    return tag.state == ROLLING and position(registered_model, device) < tag.admit


def wanted_version(
    version: str, tags: dict[str, str], alias: str | None, registered_model: str, device: str
) -> str | None:
    """The version `device` should run when the alias it follows names `version` (with `tags`): that
    version, unless a rollout of that alias is staged and has not admitted the device yet (then its
    `from` version, or None: keep what it has)."""
    tag = RolloutTag.parse(tags.get(ROLLOUT_TAG))
    if tag is None or alias is None or tag.alias != alias or tag.from_version == version:
        return version
    return version if admitted(tag, registered_model, device) else tag.from_version


def admit_after(positions: list[float], last: int) -> float:
    """The threshold that admits the devices at `positions` (sorted) up to index `last` and no further:
    halfway to the next one, or 1 (everyone, devices outside the list too) after the last."""
    if last + 1 >= len(positions):
        return 1.0
    low, high = positions[last], positions[last + 1]
    middle = (low + high) / 2
    return middle if low < middle <= high else math.nextafter(low, 1.0)


def _is_version(value: str) -> bool:
    return value.isdigit() and len(value) <= MAX_VERSION_DIGITS
