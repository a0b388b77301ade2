"""Verify a signed model release without MLflow and without the `model-signing` package.

A release is signed in the OpenSSF model-signing format (what `model_signing sign key` writes): a
Sigstore bundle (JSON) holding a DSSE envelope whose payload is an in-toto statement; its predicate
lists every file of the model directory with its digest. Among those files is the release statement,
`arachne-release.json`, naming the registered model and version, so that a signature cannot be moved
to another model. The bundle sits beside them as `arachne-release.sig` (it is not in the manifest).

This module reads that format with `cryptography` alone (a device extra of a few megabytes, where the
`model-signing` package brings sigstore and its dependencies): check the envelope's ECDSA signature
against the trusted public keys, then the manifest against the files, each file hashed once.
Everything read from the bundle is bounded before it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from arachne_mlflow.errors import (
    ArachneError,
    InvalidInputError,
    MissingDependencyError,
    TamperedModelError,
    UntrustedModelError,
)
from arachne_mlflow.model.digest import FileHashes, hash_files
from arachne_mlflow.model.directory import read_model_dir

RELEASE_FILE = "arachne-release.json"
SIGNATURE_FILE = "arachne-release.sig"
SIGNATURES_DIR = "arachne-signatures"  # among a logged model's artifacts: <name quoted>/<version>/
RELEASE_FORMAT = 1
MAX_SIGNATURE_BYTES = 4 * 1024**2
MAX_RELEASE_BYTES = 64 * 1024
MAX_SIGNED_FILES = 10_000

_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_HASHES = {"sha256": hashlib.sha256, "blake2": hashlib.blake2b}  # what hashlib has (not blake3)
_CURVES = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TrustedKey:
    """A public key a device trusts; `fingerprint` is the key hint the bundle carries."""

    fingerprint: str
    key: Any  # cryptography's EllipticCurvePublicKey
    source: str


@dataclass(frozen=True)
class Release:
    """What a verified signature says: which registered model version, signed by which key."""

    registered_model: str
    version: int
    signer: str  # the key's fingerprint
    signer_source: str  # the trusted key's file
    signed_at: str | None = None


# -- keys -----------------------------------------------------------------------------------
def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as err:
        raise MissingDependencyError(
            "verifying signed models needs the 'cryptography' package: pip install 'arachne-mlflow[verify]'"
        ) from err
    return hashes, serialization, ec


def key_fingerprint(public_key: Any) -> str:
    """The sha256 of the key's PEM (SubjectPublicKeyInfo): the hint model-signing writes into its bundles."""
    _, serialization, _ = _crypto()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def load_trusted_keys(paths: Iterable[str | os.PathLike]) -> list[TrustedKey]:
    """The public keys in `paths`: PEM files, or directories whose `*.pub` and `*.pem` files are keys."""
    keys: dict[str, TrustedKey] = {}
    for given in paths:
        path = Path(given)
        files = sorted(p for p in path.iterdir() if p.suffix in (".pub", ".pem")) if path.is_dir() else [path]
        if not files:
            raise InvalidInputError(f"trusted keys: {path} holds no *.pub or *.pem file")
        for file in files:
            key = load_public_key(file)
            keys.setdefault(key.fingerprint, key)
    if not keys:
        raise InvalidInputError("no trusted key given")
    return list(keys.values())


def load_public_key(path: str | os.PathLike) -> TrustedKey:
    """One PEM public key, elliptic curve P-256, P-384 or P-521 (the curves model-signing signs with)."""
    _, serialization, ec = _crypto()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidInputError(f"trusted key {path}: {err.strerror}") from err
    if b"PRIVATE KEY" in data:
        raise InvalidInputError(f"trusted key {path} is a private key: give the device the public key only")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise InvalidInputError(f"trusted key {path} is not a PEM public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise InvalidInputError(f"trusted key {path}: an elliptic-curve key on P-256, P-384 or P-521 is needed")
    return TrustedKey(key_fingerprint(key), key, str(path))


# -- the release statement ------------------------------------------------------------------
def release_statement(registered_model: str, version: int | str, signed_at: str | None = None) -> bytes:
    """The bytes of `arachne-release.json` for a registered model version."""
    body = {"arachne_release": RELEASE_FORMAT, "registered_model": registered_model, "version": int(version)}
    if signed_at:
        body["signed_at"] = signed_at
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def _read_release(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        data = file.read(MAX_RELEASE_BYTES + 1)
    try:
        body = json.loads(data) if len(data) <= MAX_RELEASE_BYTES else None
    except (ValueError, RecursionError) as err:
        raise TamperedModelError(f"{RELEASE_FILE} is not JSON: {err}") from err
    ok = (
        isinstance(body, dict)
        and body.get("arachne_release") == RELEASE_FORMAT
        and isinstance(body.get("registered_model"), str)
        and type(body.get("version")) is int
        and isinstance(body.get("signed_at", ""), str)
    )
    if not ok:
        raise TamperedModelError(
            f"{RELEASE_FILE} must be a JSON object with arachne_release: {RELEASE_FORMAT}, registered_model "
            "(a string) and version (an integer), at most 64 KiB"
        )
    return body


# -- the bundle -----------------------------------------------------------------------------
def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The signature file as JSON, refused when it is missing or larger than any manifest needs."""
    path = Path(path)
    if not path.is_file():
        raise UntrustedModelError(f"the model is not signed: no {path.name} beside its files")
    with open(path, "rb") as file:
        data = file.read(MAX_SIGNATURE_BYTES + 1)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise TamperedModelError(f"{path.name} is larger than {MAX_SIGNATURE_BYTES} bytes")
    try:
        bundle = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise TamperedModelError(f"{path.name} is not a Sigstore bundle (JSON): {err}") from err
    if not isinstance(bundle, dict):
        raise TamperedModelError(f"{path.name} is not a Sigstore bundle")
    return bundle


def open_bundle(bundle: Mapping[str, Any], trusted: list[TrustedKey]) -> tuple[TrustedKey, dict[str, tuple[str, str]]]:
    """The trusted key whose signature the bundle carries, and the signed manifest {file: (algorithm, hex)}."""
    try:
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        payload_type = envelope["payloadType"]
        signatures = [base64.b64decode(s["sig"], validate=True) for s in envelope["signatures"]]
        hint = (bundle.get("verificationMaterial") or {}).get("publicKey", {}).get("hint")
    except (KeyError, TypeError, AttributeError, binascii.Error) as err:
        raise TamperedModelError(f"the signature is not a DSSE envelope in a Sigstore bundle: {err!r}") from err
    if payload_type != _PAYLOAD_TYPE or len(signatures) != 1:
        raise TamperedModelError(f"the signature must carry one signature over an in-toto statement ({_PAYLOAD_TYPE})")
    candidates = [k for k in trusted if k.fingerprint == hint] if hint else trusted
    signer = next((k for k in candidates if _signed_by(k, payload, signatures[0])), None)
    if signer is None:
        raise UntrustedModelError(
            f"the model is signed by a key this device does not trust (key {str(hint)[:16] or 'unnamed'}...; "
            f"trusted: {', '.join(k.fingerprint[:16] for k in trusted)})"
        )
    return signer, _manifest(payload)


def _signed_by(key: TrustedKey, payload: bytes, signature: bytes) -> bool:
    hashes, _, ec = _crypto()
    from cryptography.exceptions import InvalidSignature

    pae = b"DSSEv1 %d %s %d " % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(), len(payload)) + payload
    try:
        key.key.verify(signature, pae, ec.ECDSA(getattr(hashes, _CURVES[key.key.curve.name])()))
    except InvalidSignature:
        return False
    return True


def _manifest(payload: bytes) -> dict[str, tuple[str, str]]:
    """The statement's resources, after checking its types and root digest (what model-signing checks)."""
    try:
        statement = json.loads(payload)
        predicate = statement["predicate"]
        resources = predicate["resources"]
        method = predicate["serialization"]["method"]
        root = statement["subject"][0]["digest"]["sha256"]
        if statement["_type"] != _STATEMENT_TYPE or statement["predicateType"] != _PREDICATE_TYPE:
            raise TamperedModelError(f"the signed statement is not a model-signing {_PREDICATE_TYPE} statement")
        if method != "files" or len(resources) > MAX_SIGNED_FILES:
            raise TamperedModelError(
                f"the signature must list at most {MAX_SIGNED_FILES} whole files (method 'files'), not {method!r}"
            )
        manifest = {r["name"]: (r["algorithm"], r["digest"]) for r in resources}
        rooted = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
        raise TamperedModelError(f"the signed statement is malformed: {err!r}") from err
    if rooted != root or len(manifest) != len(resources):
        raise TamperedModelError("the signed statement is inconsistent: its resources do not hash to its subject")
    unknown = sorted({algorithm for algorithm, _ in manifest.values()} - set(_HASHES))
    if unknown:
        raise TamperedModelError(f"the signature uses hashes this device cannot check: {unknown} (allowed: sha256)")
    return manifest


# -- verification ---------------------------------------------------------------------------
def verify_files(
    root: str | os.PathLike,
    names: Iterable[str],
    trusted: list[TrustedKey],
    *,
    registered_model: str | None = None,
    version: int | None = None,
    sha256: Mapping[str, str] | None = None,
    signature: str | os.PathLike | None = None,
    may_be_absent: Iterable[str] = (),
) -> Release:
    """Check that the files `names` under `root` (the release statement among them) are exactly what a
    trusted key signed, and return the release. `registered_model` refuses a release of another model,
    `version` a release of another version (a signature replayed onto it).
    `sha256` (file -> hex, from the install's own pass: `digest.hash_files`) saves hashing them again.
    `may_be_absent`: signed files that need not be among `names` (other variants' files)."""
    root = Path(root)
    signer, manifest = open_bundle(read_bundle(signature or root / SIGNATURE_FILE), trusted)
    names = set(names) | {RELEASE_FILE}
    added, removed = sorted(names - set(manifest)), sorted(set(manifest) - names - set(may_be_absent))
    if added or removed:
        raise TamperedModelError(
            f"the model's files differ from the signed manifest: not signed {added[:5]}, missing {removed[:5]}"
        )
    for name in sorted(names):
        algorithm, want = manifest[name]
        path = root / name
        if not path.is_file() or path.is_symlink():
            raise TamperedModelError(f"signed file {name!r} is missing or not a regular file")
        got = sha256[name] if sha256 is not None and algorithm == "sha256" and name in sha256 else None
        if (got or _hash_file(path, algorithm)) != want:
            raise TamperedModelError(f"the model's file {name!r} differs from the signed one (digest mismatch)")
    body = _read_release(root / RELEASE_FILE)
    if registered_model is not None and body["registered_model"] != registered_model:
        raise UntrustedModelError(
            f"the signature is for a release of {body['registered_model']!r} version {body['version']}, "
            f"not of {registered_model!r}"
        )
    if version is not None and body["version"] != int(version):
        raise UntrustedModelError(
            f"the signature is for version {body['version']} of {body['registered_model']!r}, not version {version}"
        )
    return Release(body["registered_model"], body["version"], signer.fingerprint, signer.source, body.get("signed_at"))


def verify_dir(
    path: str | os.PathLike,
    trusted: list[TrustedKey],
    *,
    registered_model: str | None = None,
    version: int | None = None,
    sha256: Mapping[str, str] | None = None,
    strict: bool = True,
) -> Release:
    """Verify a model directory: the files its MLmodel names and the release statement must be exactly
    the signed ones. `strict` (a device's installed copy) refuses any other file in the directory too;
    without it, other files (a registry download's `registered_model_meta`) are left out, as they do not
    travel to a device."""
    path = Path(path)
    names = set(read_model_dir(path, check_files=False).files()) | {RELEASE_FILE}
    if strict:
        names |= _present_files(path) - {SIGNATURE_FILE}
    return verify_files(path, names, trusted, registered_model=registered_model, version=version, sha256=sha256)


def verify_received(
    path: str | os.PathLike,
    trusted: list[TrustedKey],
    *,
    registered_model: str | None = None,
    version: int | None = None,
) -> tuple[Release, FileHashes]:
    """Verify a model directory as a device received it, and hash its files once (`hash_files`: the
    record's digest comes from the same read). Every file present but the signature must be signed and
    match; a signed file may be absent only if it belongs to a variant (a device receives the variant
    it runs), and every file of the variant this device would load must be present."""
    path = Path(path)
    present = _present_files(path)
    hashes = hash_files(path, present)
    try:
        variant_files = {f for v in read_model_dir(path, check_files=False).variants for f in v.variant_files()}
    except ArachneError:
        variant_files = set()  # then nothing may be absent; verify_files says what differs
    release = verify_files(
        path,
        present - {SIGNATURE_FILE},
        trusted,
        registered_model=registered_model,
        version=version,
        sha256=hashes.sha256,
        may_be_absent=variant_files,
    )
    try:
        loaded = read_model_dir(path)
    except ArachneError as err:
        raise TamperedModelError(f"the signed model's files for this device are missing: {err}") from err
    missing = sorted(set(loaded.files()) - present)
    if missing:
        raise TamperedModelError(f"signed files of the variant this device runs are missing: {missing[:5]}")
    return release, hashes


def signature_artifact_path(name: str, version: int | str) -> str:
    """Where a registered version's statement and signature live among its logged model's artifacts
    (the host stores them there, a following device downloads them from there)."""
    return f"{SIGNATURES_DIR}/{quote(name, safe='')}/{int(version)}"


def _present_files(path: Path) -> set[str]:
    present = set()
    for entry in path.rglob("*"):
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise TamperedModelError(f"{entry.relative_to(path)} in the model directory is not a regular file")
        if entry.is_file():
            present.add(entry.relative_to(path).as_posix())
    return present


def _hash_file(path: Path, algorithm: str) -> str:
    digest = _HASHES[algorithm]()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
