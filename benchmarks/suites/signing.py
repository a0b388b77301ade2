"""Verifying a signed model against hashing its files, for a 5 MB and a 100 MB model (20 MB when quick).

Rows, each against plain sha256 of the same files (target <= 1.2x for our verifier):
- `verify_files`: the device's verifier (`model/signing.py`) given the model's file names (the store has
  read MLmodel already), hashing the files itself; `verify_dir` reads MLmodel and lists the directory too;
- `install pass + verify`: what a signed install costs over today's install digest (`files_digest`):
  `hash_files` (the digest and each file's sha256 from one read, two hashers) then `verify_files` with
  those digests;
- `model_signing verify`: the OpenSSF package's own verifier, for reference (threads, sigstore's parsing).
Files are in the page cache (each candidate reads them in every round), so this is hashing, not the disk.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import yaml

from arachne_mlflow.model.digest import files_digest, hash_files, tree_files
from arachne_mlflow.model.signing import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    load_trusted_keys,
    release_statement,
    verify_dir,
    verify_files,
)
from benchmarks.timing import interleaved, row

TARGET_RATIO = 1.2


def _model_dir(path: Path, size_mb: int) -> Path:
    """A model directory whose model file has `size_mb` MB of random bytes (verification never loads it)."""
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(np.random.default_rng(size_mb).bytes(size_mb * 10**6))
    mlmodel = {"flavors": {"arachne": {"runtime": "onnx", "model_file": "model.onnx"}}}
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (path / "requirements.txt").write_text("arachne-mlflow\n")
    (path / RELEASE_FILE).write_bytes(release_statement("bench", 1))
    return path


def _keys(tmp: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem, pub = tmp / "release.pem", tmp / "release.pub"
    pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pem, pub


def _sha256_each(root: Path, names: list[str]) -> None:
    for name in names:
        digest = hashlib.sha256()
        with open(root / name, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    from model_signing import verifying

    from arachne_mlflow.flavors.signing import sign_release_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pem, pub = _keys(Path(tmp))
        trusted = load_trusted_keys([pub])
        for size_mb in (5, 20 if quick else 100):
            model = _model_dir(Path(tmp) / f"m{size_mb}", size_mb)
            sign_release_dir(model, pem)
            names = [name for name in tree_files(model) if name != SIGNATURE_FILE]
            openssf = verifying.Config().use_elliptic_key_verifier(public_key=pub)

            def install_and_verify() -> None:
                verify_files(model, names, trusted, sha256=hash_files(model, names).sha256)

            series = interleaved(
                {
                    "sha256": lambda: _sha256_each(model, names),
                    "files_digest": lambda: files_digest(model, names),
                    "verify_files": lambda: verify_files(model, names, trusted),
                    "verify_dir": lambda: verify_dir(model, trusted),
                    "install pass + verify": install_and_verify,
                    "model_signing verify": lambda: openssf.verify(model, model / SIGNATURE_FILE),
                },
                rounds=3 if quick else 9,
                number=1,
                warmup=1,
            )
            case = f"{size_mb} MB model"
            verified = row("signing", case, series["sha256"], series["verify_files"], f"<= {TARGET_RATIO}x", None)
            verified["met"] = verified["ratio_median"] <= TARGET_RATIO
            rows += [
                verified,
                row("signing", case, series["sha256"], series["verify_dir"]),
                row("signing", case, series["files_digest"], series["install pass + verify"]),
                row("signing", case, series["sha256"], series["model_signing verify"]),
            ]
    return rows
