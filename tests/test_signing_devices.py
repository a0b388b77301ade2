"""Signed models on devices (`serve --trust-key`): real device server processes, real keys made here, real
uploads with the device client; every tamper case refused on every install path (upload, rollback, restart),
each with its reason, counted; a signed model installs and serves; a device without keys behaves as before."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError, UntrustedModelError
from arachne_mlflow.flavors import variants
from arachne_mlflow.flavors.signing import sign_release_dir
from arachne_mlflow.model.digest import files_digest, tree_files
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.signing import RELEASE_FILE, SIGNATURE_FILE, load_trusted_keys, release_statement
from tests.helpers import models
from tests.helpers.keys import write_key_pair
from tests.helpers.model_dirs import scaled_linear
from tests.helpers.servers import ServerProcess
from tests.helpers.waiting import wait_for

X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-keys")
    return {name: write_key_pair(root / name, name) for name in ("release", "next", "other")}


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-models")
    return {scale: scaled_linear(root, scale) for scale in (2.0, 3.0)}


@pytest.fixture
def device(tmp_path, keys):
    """A device server that trusts the release key (started per test: its store is the test's)."""
    server = ServerProcess(tmp_path / "store", extra_args=["--trust-key", str(keys["release"][1])]).start()
    yield server
    server.stop()


def signed(model: Path, dest: Path, key: Path, name: str = "detector", version: int = 1) -> Path:
    """A copy of `model` with its release statement, signed by `key`: what a device receives."""
    shutil.copytree(model, dest)
    (dest / RELEASE_FILE).write_bytes(release_statement(name, version))
    sign_release_dir(dest, key)
    return dest


def upload(device, directory: Path, name: str = "det", files=None, **provenance):
    """Upload every file of `directory` (or `files`), as the plugin pushes a release."""
    with DeviceClient("127.0.0.1", device.port, upload_timeout=120) as client:
        client.upload_model(name, directory, files=files or tree_files(directory), provenance=provenance, force=True)


def record(device, name: str = "det") -> dict:
    return requests.get(f"{device.url}/v2/repository/models/{name}", timeout=10).json()


def infer(device, name: str = "det") -> np.ndarray:
    with DeviceClient("127.0.0.1", device.port) as client:
        return client.infer(name, {"x": X})["y"]


def expected(directory: Path) -> np.ndarray:
    """The model's answer to X on the host (onnxruntime)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(directory / read_model_dir(directory).model_file))
    return session.run(None, {"x": X})[0]


def refusals(device) -> dict[tuple[str, str], float]:
    found = {}
    for line in requests.get(f"{device.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("arachne_model_refusals_total{"):
            labels, value = line[len("arachne_model_refusals_total{") :].split("} ")
            parts = dict(part.split("=") for part in labels.split(","))
            found[(parts["model"].strip('"'), parts["reason"].strip('"'))] = float(value)
    return found


def _edit_mlmodel(directory: Path, change) -> None:
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    change(mlmodel["flavors"]["arachne"])
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


# -- uploads ------------------------------------------------------------------------------------
def test_a_signed_model_installs_and_serves_and_the_device_says_it_requires_signatures(device, linear, keys, tmp_path):
    release = signed(linear[2.0], tmp_path / "v1", keys["release"][0])
    upload(device, release, registered_model="detector", version="1")
    stored = record(device)
    fingerprint = load_trusted_keys([keys["release"][1]])[0].fingerprint
    assert stored["state"] == "READY" and stored["signature"]["signer"] == fingerprint
    assert (stored["signature"]["registered_model"], stored["signature"]["version"]) == ("detector", 1)
    assert stored["digest"] == files_digest(release, tree_files(release))  # the host's digest of what it sends
    np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)
    assert requests.get(f"{device.url}/v2", timeout=10).json()["signatures"] == {
        "required": True,
        "keys": [fingerprint],
    }


def _changed_byte(d: Path) -> None:
    _flip_byte(d / read_model_dir(d).model_file)


def _added_file(d: Path) -> None:
    (d / "extra.py").write_text("print('hello')\n")


def _removed_file(d: Path) -> None:
    next(p for p in d.iterdir() if p.name in ("requirements.txt", "conda.yaml", "python_env.yaml")).unlink()


def _options_edited(d: Path) -> None:
    _edit_mlmodel(d, lambda arachne: arachne.update(runtime_options={"intra_op_num_threads": 1}))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_changed_byte, "differs from the signed one"),
        (_added_file, "not signed ['extra.py']"),
        (_removed_file, "missing"),
        (_options_edited, "'MLmodel' differs from the signed one"),
    ],
)
def test_a_tampered_release_is_refused_and_changes_nothing(device, linear, keys, tmp_path, tamper, reason):
    upload(device, signed(linear[2.0], tmp_path / "v1", keys["release"][0]), registered_model="detector", version="1")
    before = record(device)
    release = signed(linear[3.0], tmp_path / "v2", keys["release"][0], version=2)
    tamper(release)
    with pytest.raises(InvalidInputError, match="HTTP 400") as refused:
        upload(device, release, registered_model="detector", version="2")
    assert reason in str(refused.value)
    after = record(device)
    assert after["revision"] == before["revision"] and after["digest"] == before["digest"]
    assert after["refusals"]["count"] == 1 and reason in after["refusals"]["last"]["error"]
    assert refusals(device) == {("det", "tampered"): 1.0}
    np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)
    assert not [p for p in (tmp_path / "store" / "det").iterdir() if p.name.startswith((".incoming", "v-"))][1:]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", "the model is not signed"),
        ("other key", "signed by a key this device does not trust"),
        ("other model", "release of 'classifier'"),
        ("other version", "for version 1 of 'detector', not version 2"),
    ],
)
def test_an_untrusted_release_is_refused_with_403(device, linear, keys, tmp_path, case, reason):
    key = keys["other" if case == "other key" else "release"][0]
    release = signed(linear[2.0], tmp_path / "v", key, name="classifier" if case == "other model" else "detector")
    if case == "unsigned":
        (release / SIGNATURE_FILE).unlink()
    version = "2" if case == "other version" else "1"
    with pytest.raises(UntrustedModelError, match="HTTP 403") as refused:
        upload(device, release, registered_model="detector", version=version)
    assert reason in str(refused.value)
    assert requests.get(f"{device.url}/v2/repository/models/det", timeout=10).status_code == 404
    assert refusals(device) == {("det", "untrusted"): 1.0}
    assert not (tmp_path / "store" / "det").exists()


def test_a_device_without_keys_installs_unsigned_models_as_before(linear, tmp_path):
    server = ServerProcess(tmp_path / "store").start()
    try:
        upload(server, linear[2.0], files=read_model_dir(linear[2.0]).files())
        assert record(server)["state"] == "READY" and "signature" not in record(server)
        assert requests.get(f"{server.url}/v2", timeout=10).json()["signatures"] == {"required": False, "keys": []}
        assert refusals(server) == {}
    finally:
        server.stop()


# -- rollback and restart -------------------------------------------------------------------------
def test_a_kept_version_changed_on_disk_is_not_rolled_back_to(device, linear, keys, tmp_path):
    upload(device, signed(linear[2.0], tmp_path / "v1", keys["release"][0]), registered_model="detector", version="1")
    upload(
        device,
        signed(linear[3.0], tmp_path / "v2", keys["release"][0], version=2),
        registered_model="detector",
        version="2",
    )
    kept = [p for p in (tmp_path / "store" / "det").iterdir() if p.name.startswith("v-")]
    served = record(device)
    previous = next(p for p in kept if files_digest(p, tree_files(p)) != served["digest"])
    _flip_byte(previous / read_model_dir(previous).model_file)
    answer = requests.post(f"{device.url}/v2/repository/models/det/rollback", timeout=60)
    assert answer.status_code == 400 and "differs from the signed one" in answer.json()["error"]
    assert record(device)["revision"] == served["revision"]
    np.testing.assert_allclose(infer(device), expected(linear[3.0]), rtol=1e-6)


def test_a_rollback_to_a_signed_version_works(device, linear, keys, tmp_path):
    upload(device, signed(linear[2.0], tmp_path / "v1", keys["release"][0]), registered_model="detector", version="1")
    upload(
        device,
        signed(linear[3.0], tmp_path / "v2", keys["release"][0], version=2),
        registered_model="detector",
        version="2",
    )
    answer = requests.post(f"{device.url}/v2/repository/models/det/rollback", timeout=60)
    assert answer.status_code == 200 and answer.json()["signature"]["version"] == 1
    np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)


def test_a_file_changed_on_disk_since_install_is_quarantined_at_start_up(linear, keys, tmp_path):
    args = ["--trust-key", str(keys["release"][1])]
    server = ServerProcess(tmp_path / "store", extra_args=args).start()
    try:
        upload(
            server, signed(linear[2.0], tmp_path / "v1", keys["release"][0]), registered_model="detector", version="1"
        )
        upload(server, signed(linear[3.0], tmp_path / "v2", keys["release"][0]), name="other")
    finally:
        server.stop()
    stored = next(p for p in (tmp_path / "store" / "det").iterdir() if p.name.startswith("v-"))
    _flip_byte(stored / read_model_dir(stored).model_file)
    server = ServerProcess(tmp_path / "store", extra_args=args).start()
    try:
        quarantined = record(server)
        assert quarantined["state"] == "UNAVAILABLE" and "differs from the signed one" in quarantined["reason"]
        assert record(server, "other")["state"] == "READY"  # the others load
        assert refusals(server) == {("det", "tampered"): 1.0}
        assert requests.post(f"{server.url}/v2/repository/models/det/load", timeout=60).status_code == 400
    finally:
        server.stop()


def test_a_store_of_unsigned_models_is_quarantined_when_keys_are_required(linear, keys, tmp_path):
    server = ServerProcess(tmp_path / "store").start()
    try:
        upload(server, linear[2.0], files=read_model_dir(linear[2.0]).files())
    finally:
        server.stop()
    server = ServerProcess(tmp_path / "store", extra_args=["--trust-key", str(keys["release"][1])]).start()
    try:
        assert "the model is not signed" in record(server)["reason"]
    finally:
        server.stop()


def test_key_rotation_trusts_a_directory_of_keys(linear, keys, tmp_path):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    for name in ("release", "next"):
        shutil.copy(keys[name][1], trusted)
    server = ServerProcess(tmp_path / "store", extra_args=["--trust-key", str(trusted)]).start()
    try:
        assert len(requests.get(f"{server.url}/v2", timeout=10).json()["signatures"]["keys"]) == 2
        for version, key in ((1, "release"), (2, "next")):
            release = signed(linear[2.0], tmp_path / f"v{version}", keys[key][0], version=version)
            upload(server, release, registered_model="detector", version=str(version))
        assert record(server)["signature"]["version"] == 2
    finally:
        server.stop()


# -- variants ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_variants(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("variants")
    onnx_file = root / "linear.onnx"
    onnx_file.write_bytes(models.onnx_linear_scaled(2.0, batch=1).SerializeToString())
    path = root / "model"
    variants.save_model(
        {
            "first": variants.Variant("onnx", str(onnx_file)),
            "second": variants.Variant("onnx", models.onnx_linear_scaled(2.0, batch=1)),
        },
        path,
    )
    (path / RELEASE_FILE).write_bytes(release_statement("detector", 1))
    sign_release_dir(path, keys["release"][0])
    return path


def test_a_device_receiving_one_variant_of_a_signed_model_installs_it(device, two_variants, tmp_path):
    model = read_model_dir(two_variants, variant="second")
    first = set(read_model_dir(two_variants, variant="first").variant_files())
    files = [*model.files(), RELEASE_FILE, SIGNATURE_FILE]
    assert first.isdisjoint(model.variant_files())
    upload(device, two_variants, files=files, registered_model="detector", version="1")
    assert record(device)["state"] == "READY"
    np.testing.assert_allclose(infer(device), expected(two_variants), rtol=1e-6)
    # an unsigned file beside the variant's is still refused, and so is a variant without its model file
    copy = tmp_path / "copy"
    shutil.copytree(two_variants, copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="not signed"):
        upload(device, copy, files=[*files, "extra.bin"], registered_model="detector", version="1")
    without = [f for f in files if f != model.model_file]
    with pytest.raises(InvalidInputError, match="HTTP 400") as refused:
        upload(device, copy, files=without, registered_model="detector", version="1")
    assert "missing" in str(refused.value)
    assert record(device)["refusals"]["count"] == 2


# -- pull mode: a real `mlflow server`, a device following an alias ---------------------------------
def _follow_state(device, version: str):
    """The follower's status once it is done with `version` (installed it, or refused it)."""
    answer = requests.get(f"{device.url}/v2/repository/models/det", timeout=10)
    follow = answer.json().get("follow", {}) if answer.status_code == 200 else {}
    done = follow.get("failed_version") == version or (
        follow.get("version") == version and follow["state"] == "following"
    )
    return follow if done else None


def test_pull_mode_installs_signed_releases_and_refuses_the_others(tracking_server, linear, keys, tmp_path):
    from mlflow import MlflowClient

    from arachne_mlflow.flavors import onnx as arachne_onnx
    from arachne_mlflow.flavors.signing import sign_model_version, signature_path

    client, registered = MlflowClient(tracking_server), f"pulled-{uuid.uuid4().hex[:8]}"
    onnx_files = {scale: next(linear[scale].glob("*.onnx")) for scale in linear}

    def register(scale: float, name: str = registered):
        info = arachne_onnx.log_model(str(onnx_files[scale]), name="model", registered_model_name=name)
        return info, str(info.registered_model_version)

    _, v1 = register(2.0)
    sign_model_version(f"models:/{registered}/{v1}", keys["release"][0], client=client)
    client.set_registered_model_alias(registered, "prod", v1)
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server}
    args = [
        "--follow",
        f"det=models:/{registered}@prod",
        "--follow-interval",
        "1",
        "--trust-key",
        str(keys["release"][1]),
    ]
    device = ServerProcess(tmp_path / "store", extra_args=args, env=environment).start()
    try:
        assert wait_for(lambda: _follow_state(device, v1))["state"] == "following"
        assert record(device)["signature"]["version"] == int(v1)
        np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)

        _, unsigned = register(3.0)  # an unsigned version
        info, replayed = register(3.0)  # a version carrying another registered model's valid signature
        other = f"{registered}-other"
        client.create_registered_model(other)
        client.create_model_version(other, info.model_uri, model_id=info.model_id)
        sign_model_version(f"models:/{other}/1", keys["release"][0], client=client)
        copied = tmp_path / "copied"
        mlflow.artifacts.download_artifacts(
            f"{client.get_logged_model(info.model_id).artifact_location}/{signature_path(other, 1)}",
            dst_path=str(copied),
            tracking_uri=tracking_server,
        )
        client.log_model_artifacts(info.model_id, str(copied / "1"), artifact_path=signature_path(registered, replayed))
        _, untrusted = register(3.0)
        sign_model_version(f"models:/{registered}/{untrusted}", keys["other"][0], client=client)
        for version, reason in (
            (unsigned, "the model is not signed"),
            (replayed, f"release of '{other}'"),
            (untrusted, "does not trust"),
        ):
            client.set_registered_model_alias(registered, "prod", version)
            follow = wait_for(lambda version=version: _follow_state(device, version))
            assert follow["state"] == "failed" and reason in follow["last_error"], follow
            assert record(device)["provenance"]["version"] == v1
        np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)

        _, v5 = register(3.0)
        sign_model_version(f"models:/{registered}/{v5}", keys["release"][0], client=client)
        client.set_registered_model_alias(registered, "prod", v5)
        assert wait_for(lambda: _follow_state(device, v5))["state"] == "following"
        np.testing.assert_allclose(infer(device), expected(linear[3.0]), rtol=1e-6)
        client.set_registered_model_alias(registered, "prod", v1)  # an older signed release: no silent downgrade
        follow = wait_for(lambda: _follow_state(device, v1))
        assert follow["state"] == "failed" and f"older than the signed version {v5}" in follow["last_error"]
        assert record(device)["signature"]["version"] == int(v5)
        assert refusals(device) == {("det", "untrusted"): 3.0, ("det", "downgrade"): 1.0}
    finally:
        device.stop()


# -- the deployments plugin: verify before pushing, no unsigned push to a device that requires signatures ---
def test_the_plugin_pushes_signed_releases_and_refuses_unsigned_ones(
    tracking_server, linear, keys, tmp_path, capsys, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    from arachne_mlflow.flavors import onnx as arachne_onnx
    from arachne_mlflow.flavors.signing import sign_model_version
    from tests.helpers.fleet import fleet_command, fleet_file

    registered = f"pushed-{uuid.uuid4().hex[:8]}"
    onnx_file = next(linear[2.0].glob("*.onnx"))
    for _ in range(2):
        arachne_onnx.log_model(str(onnx_file), name="model", registered_model_name=registered)
    sign_model_version(f"models:/{registered}/1", keys["release"][0], client=MlflowClient(tracking_server))
    strict = ServerProcess(tmp_path / "strict", extra_args=["--trust-key", str(keys["release"][1])]).start()
    plain = ServerProcess(tmp_path / "plain").start()
    try:
        fleet = fleet_file(tmp_path / "fleet.yaml", [strict, plain])
        monkeypatch.setenv("ARACHNE_FLEET", str(fleet))
        client = get_deploy_client("arachne-jetson://@all")
        result = client.create_deployment("det", f"models:/{registered}/1", config={"report": "false"})
        assert [d["state"] for d in result["devices"]] == ["deployed", "deployed"]
        for device in (strict, plain):
            np.testing.assert_allclose(infer(device), expected(linear[2.0]), rtol=1e-6)
        fingerprint = load_trusted_keys([keys["release"][1]])[0].fingerprint
        assert record(strict)["signature"]["signer"] == fingerprint
        code, out, _ = fleet_command(capsys, "status", "det")
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("cam-")}
        assert code == 0 and rows["cam-0"].endswith(f"key {fingerprint[:16]} (required)"), out
        assert rows["cam-1"].endswith("not checked")

        # an unsigned version: not pushed to the device that requires signatures, pushed to the other
        with pytest.raises(MlflowException) as failed:
            client.update_deployment("det", f"models:/{registered}/2", config={"report": "false"})
        assert "requires signed models (serve --trust-key)" in str(failed.value) and "nothing was sent" in str(
            failed.value
        )
        assert record(strict)["provenance"]["version"] == "1" and "refusals" not in record(strict)
        assert record(plain)["provenance"]["version"] == "2"

        # keys on the host: a release another key signed, or an unsigned one, is refused before any device is asked
        with pytest.raises(MlflowException, match="does not trust"):
            client.update_deployment(
                "det", f"models:/{registered}/1", config={"report": "false", "trust_keys": str(keys["other"][1])}
            )
        fleet.write_text(fleet.read_text() + f"trust_keys: [{keys['release'][1]}]\n")
        with pytest.raises(MlflowException, match="the model is not signed"):
            client.update_deployment("det", f"models:/{registered}/2", config={"report": "false"})
        assert record(plain)["provenance"]["version"] == "2"
        result = client.update_deployment("det", f"models:/{registered}/1", config={"report": "false"})
        assert [d["state"] for d in result["devices"]] == ["unchanged", "deployed"]
    finally:
        strict.stop()
        plain.stop()
        MlflowClient(tracking_server).delete_registered_model(registered)  # and the deployment it records
