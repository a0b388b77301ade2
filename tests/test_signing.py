"""Signed model releases: the device-side verifier (`model/signing.py`) against real keys, every way a
signed directory can be tampered with, and the OpenSSF `model_signing` command both ways."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from arachne_mlflow.errors import InvalidInputError, TamperedModelError, UntrustedModelError
from arachne_mlflow.flavors.signing import sign_release_dir
from arachne_mlflow.model.digest import files_digest, hash_files, tree_files
from arachne_mlflow.model.signing import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    key_fingerprint,
    load_trusted_keys,
    release_statement,
    verify_dir,
)
from tests.helpers.keys import write_key_pair
from tests.helpers.model_dirs import scaled_linear

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    release = write_key_pair(root / "release", "release")
    other = write_key_pair(root / "other", "other", ec.SECP384R1)
    return {"release": release, "other": other, "trusted": load_trusted_keys([release[1]])}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return scaled_linear(tmp_path_factory.mktemp("signed-models"), 2.0)


def signed_copy(model: Path, dest: Path, key: Path, name: str = "detector", version: int = 3) -> Path:
    shutil.copytree(model, dest)
    (dest / RELEASE_FILE).write_bytes(release_statement(name, version, "2026-12-01T00:00:00+00:00"))
    sign_release_dir(dest, key)
    return dest


def test_a_signed_directory_verifies_as_its_release(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    release = verify_dir(signed, keys["trusted"], registered_model="detector")
    assert (release.registered_model, release.version) == ("detector", 3)
    assert release.signer == keys["trusted"][0].fingerprint and release.signed_at.startswith("2026-12-01")
    assert release.signer_source == str(keys["release"][1])


def test_a_changed_byte_is_refused(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    data = bytearray((signed / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (signed / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedModelError, match="'model.onnx' differs"):
        verify_dir(signed, keys["trusted"])


@pytest.mark.parametrize("added", ["extra.bin", "sub/dir/extra.bin", ".gitattributes"])
def test_an_added_file_is_refused(model, keys, tmp_path, added):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    (signed / added).parent.mkdir(parents=True, exist_ok=True)
    (signed / added).write_bytes(b"payload")
    with pytest.raises(TamperedModelError, match="not signed"):
        verify_dir(signed, keys["trusted"])
    # left out of a registry download's check (strict=False), as such a file does not travel to a device
    assert verify_dir(signed, keys["trusted"], strict=False).version == 3


@pytest.mark.parametrize("removed", ["requirements.txt", RELEASE_FILE])
def test_a_removed_file_is_refused(model, keys, tmp_path, removed):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    (signed / removed).unlink()
    with pytest.raises(TamperedModelError, match="missing"):
        verify_dir(signed, keys["trusted"])


def test_a_changed_release_statement_is_refused(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    (signed / RELEASE_FILE).write_bytes(release_statement("detector", 9))
    with pytest.raises(TamperedModelError, match=f"'{RELEASE_FILE}' differs"):
        verify_dir(signed, keys["trusted"])


def test_an_unsigned_model_is_refused(model, keys):
    with pytest.raises(UntrustedModelError, match="not signed"):
        verify_dir(model, keys["trusted"])


def test_another_key_is_refused_even_without_the_key_hint(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["other"][0])
    with pytest.raises(UntrustedModelError, match="does not trust"):
        verify_dir(signed, keys["trusted"])
    bundle = json.loads((signed / SIGNATURE_FILE).read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]  # every trusted key is then tried
    (signed / SIGNATURE_FILE).write_text(json.dumps(bundle))
    with pytest.raises(UntrustedModelError, match="does not trust"):
        verify_dir(signed, keys["trusted"])
    both = load_trusted_keys([keys["release"][1], keys["other"][1]])
    assert verify_dir(signed, both).signer == key_fingerprint(both[1].key)


def test_a_release_of_another_registered_model_is_refused(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0], name="other-model")
    with pytest.raises(UntrustedModelError, match="'other-model'"):
        verify_dir(signed, keys["trusted"], registered_model="detector")


def test_a_signature_moved_to_another_model_is_refused(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    other = scaled_linear(tmp_path / "o", -1.0)
    (other / RELEASE_FILE).write_bytes((signed / RELEASE_FILE).read_bytes())
    shutil.copyfile(signed / SIGNATURE_FILE, other / SIGNATURE_FILE)
    with pytest.raises(TamperedModelError, match="differs"):
        verify_dir(other, keys["trusted"])


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not json", "not a Sigstore bundle"),
        (b"[1, 2]", "not a Sigstore bundle"),
        (b"[" * 100_000, "not a Sigstore bundle"),
        (b'{"dsseEnvelope": {"payload": "%%%", "payloadType": "x", "signatures": []}}', "not a DSSE envelope"),
        (b" " * (4 * 1024**2 + 1), "larger than"),
    ],
)
def test_a_malformed_signature_is_refused(model, keys, tmp_path, content, match):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    (signed / SIGNATURE_FILE).write_bytes(content)
    with pytest.raises(TamperedModelError, match=match):
        verify_dir(signed, keys["trusted"])


def test_trusted_keys_from_a_directory_and_what_is_refused(keys, tmp_path):
    directory = tmp_path / "trusted"
    directory.mkdir()
    for _, pub in (keys["release"], keys["other"]):
        shutil.copy(pub, directory)
    (directory / "README").write_text("not a key")
    assert len(load_trusted_keys([directory, keys["release"][1]])) == 2  # the same key twice counts once
    with pytest.raises(InvalidInputError, match="private key"):
        load_trusted_keys([keys["release"][0]])
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidInputError, match="elliptic-curve"):
        load_trusted_keys([rsa_pub])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no \\*.pub"):
        load_trusted_keys([tmp_path / "empty"])


def test_the_install_pass_hashes_each_file_once(model, keys, tmp_path):
    """`hash_files` gives the install's digest and each file's sha256; verification uses those digests."""
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    names = [name for name in tree_files(signed) if name != SIGNATURE_FILE]
    hashes = hash_files(signed, names)
    assert hashes.digest == files_digest(signed, names)
    assert verify_dir(signed, keys["trusted"], sha256=hashes.sha256).version == 3
    wrong = dict(hashes.sha256, **{"model.onnx": "00" * 32})  # proof that the given digests are what is compared
    with pytest.raises(TamperedModelError, match="'model.onnx' differs"):
        verify_dir(signed, keys["trusted"], sha256=wrong)


def test_the_verifier_needs_neither_mlflow_nor_model_signing(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    code = (
        "import sys; from arachne_mlflow.model.signing import load_trusted_keys, verify_dir;"
        f"print(verify_dir({str(signed)!r}, load_trusted_keys([{str(keys['release'][1])!r}])).version);"
        "print(sorted(m for m in ('mlflow', 'model_signing', 'sigstore', 'google.protobuf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "[]"]


# -- the OpenSSF model_signing command, both ways ------------------------------------------
def _openssf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MODEL_SIGNING), *args], capture_output=True, text=True, timeout=120)


def test_our_signature_verifies_with_the_openssf_command(model, keys, tmp_path):
    signed = signed_copy(model, tmp_path / "m", keys["release"][0])
    signature = str(signed / SIGNATURE_FILE)
    done = _openssf("verify", "key", str(signed), "--signature", signature, "--public_key", str(keys["release"][1]))
    assert done.returncode == 0 and "Verification succeeded" in done.stdout + done.stderr, done.stderr
    (signed / "model.onnx").write_bytes((signed / "model.onnx").read_bytes() + b"\0")
    done = _openssf("verify", "key", str(signed), "--signature", signature, "--public_key", str(keys["release"][1]))
    assert done.returncode != 0 and "model.onnx" in done.stdout + done.stderr


def test_a_directory_signed_by_the_openssf_command_is_accepted(model, keys, tmp_path):
    directory = shutil.copytree(model, tmp_path / "m")
    (directory / RELEASE_FILE).write_bytes(release_statement("detector", 4))
    signature = str(directory / SIGNATURE_FILE)
    done = _openssf("sign", "key", str(directory), "--signature", signature, "--private_key", str(keys["release"][0]))
    assert done.returncode == 0, done.stderr
    release = verify_dir(directory, keys["trusted"], registered_model="detector")
    assert (release.version, release.signer) == (4, keys["trusted"][0].fingerprint)
    (directory / "requirements.txt").write_text("something else\n")
    with pytest.raises(TamperedModelError, match="'requirements.txt' differs"):
        verify_dir(directory, keys["trusted"])
