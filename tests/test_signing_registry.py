"""Signing registered model versions in a real MLflow store (sqlite): the signature stored with the
version, its tag, verification from the registry, signing at log time, and the `arachne-mlflow` command."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mlflow import MlflowClient

from arachne_mlflow import cli
from arachne_mlflow.errors import InvalidInputError, UntrustedModelError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors.signing import (
    SIGNATURE_TAG,
    sign_model_version,
    signature_path,
    verify_model_version,
)
from arachne_mlflow.model.signing import RELEASE_FILE, SIGNATURE_FILE, load_trusted_keys
from tests.helpers.keys import write_key_pair


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {"release": write_key_pair(root / "release", "release"), "other": write_key_pair(root / "other", "other")}


def _register(name: str, onnx_file, **kwargs):
    return arachne_onnx.log_model(str(onnx_file), name="model", registered_model_name=name, **kwargs)


def _artifacts(info) -> str:
    """The logged model's artifact location (where the signature is stored beside the model's files)."""
    return MlflowClient().get_logged_model(info.model_id).artifact_location


def test_a_signed_version_carries_its_signature_and_tag(mlflow_store, onnx_linear_file, keys):
    info = _register("signed-detector", onnx_linear_file)
    MlflowClient().set_registered_model_alias("signed-detector", "champion", info.registered_model_version)
    signed = sign_model_version("models:/signed-detector@champion", keys["release"][0])
    trusted = load_trusted_keys([keys["release"][1]])
    assert (signed.registered_model, signed.version, signed.key) == ("signed-detector", 1, trusted[0].fingerprint)
    tag = json.loads(MlflowClient().get_model_version("signed-detector", "1").tags[SIGNATURE_TAG])
    assert tag == {
        "key": signed.key,
        "signed_at": signed.signed_at,
        "path": signature_path("signed-detector", 1),
        "format": "model-signing/v1.0",
    }
    stored = mlflow.artifacts.list_artifacts(f"{_artifacts(info)}/{signed.artifact_path}")
    assert {a.path.rsplit("/", 1)[-1] for a in stored} == {RELEASE_FILE, SIGNATURE_FILE}
    for uri in ("models:/signed-detector/1", "models:/signed-detector@champion"):
        release = verify_model_version(uri, [keys["release"][1]])
        assert (release.registered_model, release.version, release.signer) == ("signed-detector", 1, signed.key)
    with pytest.raises(UntrustedModelError, match="does not trust"):
        verify_model_version("models:/signed-detector/1", [keys["other"][1]])


def test_an_unsigned_version_and_a_replayed_signature_are_refused(mlflow_store, onnx_linear_file, keys, tmp_path):
    """Version 2 registers the same logged model as version 1: version 1's signature does not sign it."""
    info = _register("replayed", onnx_linear_file)
    sign_model_version("models:/replayed/1", keys["release"][0])
    second = mlflow.register_model(info.model_uri, "replayed")
    with pytest.raises(UntrustedModelError, match="not signed"):
        verify_model_version(f"models:/replayed/{second.version}", [keys["release"][1]])
    copied = tmp_path / "copied"
    mlflow.artifacts.download_artifacts(f"{_artifacts(info)}/{signature_path('replayed', 1)}", dst_path=str(copied))
    MlflowClient().log_model_artifacts(
        info.model_id, str(copied / "1"), artifact_path=signature_path("replayed", second.version)
    )
    with pytest.raises(UntrustedModelError, match="for version 1 of 'replayed', not version 2"):
        verify_model_version(f"models:/replayed/{second.version}", [keys["release"][1]])


def test_signing_at_log_time(mlflow_store, onnx_linear_file, keys, tmp_path):
    info = _register("signed-at-log", onnx_linear_file, signing_key=str(keys["release"][0]))
    release = verify_model_version(f"models:/signed-at-log/{info.registered_model_version}", [keys["release"][1]])
    assert (release.registered_model, release.version) == ("signed-at-log", 1)
    with pytest.raises(InvalidInputError, match="registered_model_name"):
        arachne_onnx.log_model(str(onnx_linear_file), name="model", signing_key=str(keys["release"][0]))
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(InvalidInputError, match="elliptic-curve"):
        _register("never-registered", onnx_linear_file, signing_key=str(rsa_key))
    assert not MlflowClient().search_registered_models("name = 'never-registered'")  # refused before logging


def test_the_sign_and_verify_commands(mlflow_store, onnx_linear_file, keys, tmp_path, capsys):
    _register("cli-signed", onnx_linear_file)
    assert cli.main(["sign", "models:/cli-signed/1", "--key", str(keys["release"][0])]) == 0
    assert "signed models:/cli-signed/1 with key" in capsys.readouterr().out
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    for _, pub in keys.values():
        shutil.copy(pub, trusted)
    assert cli.main(["verify", "models:/cli-signed/1", "--key", str(trusted)]) == 0
    assert f"signed by {trusted / 'release.pub'}" in capsys.readouterr().out
    assert cli.main(["verify", "models:/cli-signed/1", "--key", str(keys["other"][1])]) == 1
    assert "does not trust" in capsys.readouterr().err
