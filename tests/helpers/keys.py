"""Signing keys made for a test (cryptography), written as PEM files."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def write_key_pair(directory: Path, name: str, curve=ec.SECP256R1) -> tuple[Path, Path]:
    """A private key (PEM, unencrypted) and its public key, written as name.pem and name.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(curve())
    pem, pub = directory / f"{name}.pem", directory / f"{name}.pub"
    pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pem, pub
