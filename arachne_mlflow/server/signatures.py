"""Signed models on the device (`serve --trust-key`): what the store checks before it installs, rolls
back to or loads a version, and what it remembers of the versions it refused.

With trusted keys, every version must be a release signed by one of them, whose files are exactly
the signed ones (model/signing.py `verify_received`: a multi-variant model may arrive with only the
variant this device runs); without, nothing is checked and nothing changes. A refusal is an
`UntrustedModelError` (403: unsigned, another key, another registered model or version, an older
release pulled from the registry) or a `TamperedModelError` (400: a file differs, is added or is
missing); each is counted per model and reason (`/metrics`) and the last one kept for the record.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import ArachneError, TamperedModelError, UntrustedModelError

#: The reasons refusals are counted under.
UNTRUSTED, TAMPERED, DOWNGRADE = "untrusted", "tampered", "downgrade"


@dataclass(frozen=True)
class Verified:
    """A version that passed: the record's `signature` entry and its files' digest (hashed once)."""

    signature: dict[str, Any]
    digest: str


class SignaturePolicy:
    """The trusted keys of a device server (none: signatures are not required) and its refusals."""

    def __init__(self, trusted: Sequence[Any] = ()):
        self.trusted = list(trusted)
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str], int] = {}  # (model, reason) -> refusals
        self._last: dict[str, dict[str, Any]] = {}

    @property
    def required(self) -> bool:
        return bool(self.trusted)

    def metadata(self) -> dict[str, Any]:
        """What `GET /v2` says: whether this device requires signed models, and the keys it trusts."""
        return {"required": self.required, "keys": [key.fingerprint for key in self.trusted]}

    def verify(self, name: str, path: Path, provenance: Mapping[str, Any] | None) -> Verified | None:
        """Verify the version at `path` for model `name` (None when no key is required); a refusal is
        counted, then raised. The provenance's registered model and version, when given, must be the
        signed release's."""
        if not self.required:
            return None
        from arachne_mlflow.model.signing import verify_received

        provenance = provenance or {}
        version = provenance.get("version")
        try:
            release, hashes = verify_received(
                path,
                self.trusted,
                registered_model=provenance.get("registered_model"),
                version=int(version) if str(version or "").isdigit() else None,
            )
        except (UntrustedModelError, TamperedModelError) as err:
            self.refused(name, err)
            raise
        signature = {
            "signer": release.signer,
            "registered_model": release.registered_model,
            "version": release.version,
            "signed_at": release.signed_at,
        }
        return Verified({k: v for k, v in signature.items() if v is not None}, hashes.digest)

    def refused(self, name: str, err: ArachneError, reason: str | None = None) -> None:
        """Count a refusal of a version of `name` and keep it as the last one."""
        reason = reason or (TAMPERED if isinstance(err, TamperedModelError) else UNTRUSTED)
        with self._lock:
            self.counts[(name, reason)] = self.counts.get((name, reason), 0) + 1
            total = sum(n for (model, _), n in self.counts.items() if model == name)
            at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._last[name] = {"count": total, "last": {"at": at, "reason": reason, "error": str(err)}}

    def refusals(self, name: str) -> dict[str, Any] | None:
        """How many versions of `name` were refused, and the last refusal (None: none)."""
        with self._lock:
            found = self._last.get(name)
            return {"count": found["count"], "last": dict(found["last"])} if found else None
