"""Sign a registered model version (host side), and verify one from the registry.

    from arachne_mlflow.flavors.signing import sign_model_version, verify_model_version
    signed = sign_model_version("models:/detector/3", "release.pem")
    release = verify_model_version("models:/detector@champion", ["release.pub"])

Signing writes the release statement (`arachne-release.json`: registered model and version) beside
the files MLmodel names and signs them all with the OpenSSF `model-signing` package (an elliptic-curve
private key). The statement and the signature (`arachne-release.sig`) are stored with the logged model
the version points to, under `arachne-signatures/<name>/<version>/` (one logged model may be
registered under several names), and the version gets the tag `arachne.signature` (key fingerprint,
time, where): the MLflow UI shows it. What a device receives is `release_layout`: the model's files,
the statement and the signature in one directory, which `model.signing.verify_dir` checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from arachne_mlflow.errors import InvalidInputError, MissingDependencyError
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.signing import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    Release,
    TrustedKey,
    key_fingerprint,
    load_trusted_keys,
    release_statement,
    signature_artifact_path,
    verify_dir,
)

SIGNATURE_TAG = "arachne.signature"


@dataclass(frozen=True)
class SignedRelease:
    """A signed registered model version: who signed it, when, and where the signature is stored."""

    registered_model: str
    version: int
    key: str  # the key's fingerprint
    signed_at: str
    artifact_path: str  # in the logged model's artifacts


# -- signing a directory --------------------------------------------------------------------
def sign_release_dir(path: str | os.PathLike, key: str | os.PathLike, password: str | None = None) -> str:
    """Sign every file of `path` (the model's files and the release statement) into `path/arachne-release.sig`
    with model-signing's key signer; returns the key's fingerprint."""
    model_signing = _model_signing()
    fingerprint = check_signing_key(key, password)
    path = Path(path)
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    signature = path / SIGNATURE_FILE
    signature.unlink(missing_ok=True)
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=key, password=password)
    config.set_hashing_config(hashing).sign(path, signature)
    return fingerprint


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
    except ImportError as err:
        raise MissingDependencyError(
            f"signing models needs the 'model-signing' package: pip install 'arachne-mlflow[signing]' ({err})"
        ) from err
    return model_signing


def check_signing_key(key: str | os.PathLike, password: str | None) -> str:
    """The fingerprint of the private key's public half; a clear error for what model-signing cannot use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password.encode() if password else None)
    except (OSError, ValueError, TypeError) as err:
        raise InvalidInputError(f"signing key {key}: cannot read a PEM private key: {err}") from err
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise InvalidInputError(f"signing key {key}: model-signing signs with elliptic-curve keys (P-256/384/521)")
    return key_fingerprint(private.public_key())


# -- the registry ---------------------------------------------------------------------------
def sign_model_version(
    model_uri: str, key: str | os.PathLike, password: str | None = None, client=None
) -> SignedRelease:
    """Sign the registered version `model_uri` names (`models:/name/3` or `models:/name@alias`) and store
    the signature with it; signing again (another key, a rotated one) replaces the previous signature."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    version = resolve_version(model_uri, client)
    model_id = logged_model_id(version)
    signed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    artifact_path = signature_path(version.name, version.version)
    with tempfile.TemporaryDirectory(prefix="arachne-sign-") as tmp:
        download = _download(client, version, Path(tmp) / "model")
        stage = Path(tmp) / "release"
        _link_files(download, stage, read_model_dir(download).files())
        (stage / RELEASE_FILE).write_bytes(release_statement(version.name, version.version, signed_at))
        fingerprint = sign_release_dir(stage, key, password)
        out = Path(tmp) / "out"
        out.mkdir()
        for name in (RELEASE_FILE, SIGNATURE_FILE):
            shutil.copyfile(stage / name, out / name)
        client.log_model_artifacts(model_id, str(out), artifact_path=artifact_path)
    tag = {"key": fingerprint, "signed_at": signed_at, "path": artifact_path, "format": "model-signing/v1.0"}
    client.set_model_version_tag(version.name, version.version, SIGNATURE_TAG, json.dumps(tag, sort_keys=True))
    return SignedRelease(version.name, int(version.version), fingerprint, signed_at, artifact_path)


def verify_model_version(model_uri: str, trusted: list[TrustedKey] | list[str | os.PathLike], client=None) -> Release:
    """Download the registered version `model_uri` names and verify it as a device would (`verify_dir`):
    the files a device receives are exactly what a trusted key signed, as a release of this version."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    keys = trusted if trusted and isinstance(trusted[0], TrustedKey) else load_trusted_keys(trusted)
    version = resolve_version(model_uri, client)
    with tempfile.TemporaryDirectory(prefix="arachne-verify-") as tmp:
        download = _download(client, version, Path(tmp) / "model")
        layout = release_layout(download, version.name, version.version, Path(tmp) / "release")
        return verify_dir(layout, keys, registered_model=version.name, version=int(version.version))


def release_layout(download: str | os.PathLike, name: str, version: int | str, dest: str | os.PathLike) -> Path:
    """`dest` made into what a device receives from a downloaded version: the files MLmodel names, and
    the release statement and signature stored for this registered version (absent if it is unsigned)."""
    download, dest = Path(download), Path(dest)
    _link_files(download, dest, read_model_dir(download).files())
    stored = download / signature_path(name, version)
    for file in (RELEASE_FILE, SIGNATURE_FILE):
        if (stored / file).is_file():
            _link(stored / file, dest / file)
    return dest


def signature_path(name: str, version: int | str) -> str:
    """Where a registered version's statement and signature live among its logged model's artifacts."""
    return signature_artifact_path(name, version)


def resolve_version(model_uri: str, client):
    """The `ModelVersion` a `models:/name/version` or `models:/name@alias` URI names."""
    prefix = "models:/"
    rest = model_uri[len(prefix) :] if model_uri.startswith(prefix) else ""
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = rest.rpartition("/")
    if not name or not number.isdigit():
        raise InvalidInputError(f"{model_uri!r}: give a registered version, models:/NAME/VERSION or models:/NAME@ALIAS")
    return client.get_model_version(name, number)


def logged_model_id(version) -> str:
    """The logged model a registered version points to (MLflow 3 registers `models:/m-<id>` as its source)."""
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    if version.model_id or match:
        return version.model_id or match.group(1)
    raise InvalidInputError(
        f"models:/{version.name}/{version.version} comes from {version.source!r}, not from a logged model: log the "
        "model with log_model (MLflow 3) and register that, then sign it"
    )


def _download(client, version, dest: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    dest.mkdir(parents=True)
    return Path(download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(dest)))


def _link_files(source: Path, dest: Path, names: list[str]) -> None:
    for name in names:
        _link(source / name, dest / name)


def _link(source: Path, target: Path) -> None:
    """A hard link where the file system allows it (no copy of a large model), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
