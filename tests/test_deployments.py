"""The `arachne-jetson` deployments plugin: the real `mlflow deployments` CLI and Python API against
real device servers on loopback, with models from a real MLflow registry (sqlite)."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.deployments import PredictionsResponse, get_deploy_client
from mlflow.deployments.cli import commands
from mlflow.exceptions import MlflowException

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.deployments.local import run_local
from arachne_mlflow.deployments.targets import resolve_target
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors import tflite as arachne_tflite
from arachne_mlflow.fleet.device import Device
from tests.helpers import models
from tests.helpers.model_dirs import write_model_dir
from tests.helpers.servers import ServerProcess, free_port
from tests.helpers.tls import self_signed_cert

pytestmark = pytest.mark.slow  # real server processes (or the benchmarks): `make test-fast` skips them

TOKEN = "deploy-token"
X = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


def _expected(onnx_model, x=X):
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init("onnx", model_content=onnx_model.SerializeToString()) as module:
        return module.infer([x])[0]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = [ServerProcess(tmp_path_factory.mktemp(f"device{i}") / "store", token=TOKEN).start() for i in range(2)]
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def registry(mlflow_store, tflite_two_inputs_file):
    """`dep-linear` versions 1 (alias champion) and 2, `dep-two` (two inputs), a model without `arachne`."""
    client = MlflowClient()
    with mlflow.start_run() as run:
        v1 = arachne_onnx.log_model(models.onnx_linear_scaled(1.0), name="model", registered_model_name="dep-linear")
    v2_model = models.onnx_linear_scaled(-2.0)
    v2 = arachne_onnx.log_model(v2_model, name="model2", registered_model_name="dep-linear")  # no run
    client.set_registered_model_alias("dep-linear", "champion", v1.registered_model_version)
    two = arachne_tflite.log_model(str(tflite_two_inputs_file), name="two", registered_model_name="dep-two")
    plain = mlflow.onnx.log_model(models.onnx_linear(1), name="plain")
    return {
        "run_id": run.info.run_id,
        "v1": v1,
        "v2": v2,
        "two": two,
        "plain": plain,
        "out1": _expected(models.onnx_linear_scaled(1.0)),
        "out2": _expected(models.onnx_linear_scaled(-2.0)),
    }


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("ARACHNE_TOKEN", TOKEN)


def _target(*servers_or_ports):
    ports = [s if isinstance(s, int) else s.port for s in servers_or_ports]
    return "arachne-jetson://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def _cli(*args):
    result = CliRunner().invoke(commands, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _device(server):
    return DeviceClient("127.0.0.1", server.port, token=TOKEN)


# -- target URIs and help ----------------------------------------------------------------------
def test_target_uris(monkeypatch, tmp_path):
    monkeypatch.delenv("ARACHNE_DEVICE", raising=False)
    monkeypatch.delenv("ARACHNE_FLEET", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no fleet file
    assert resolve_target("arachne-jetson") == [Device("localhost", 5051)]
    monkeypatch.setenv("ARACHNE_DEVICE", "jetson-1:6000")
    assert resolve_target("arachne-jetson") == [Device("jetson-1", 6000)]
    assert resolve_target("arachne-jetson://j1:5052") == [Device("j1", 5052)]
    assert resolve_target("arachne-jetson:/j1:5052") == [Device("j1", 5052)]
    assert resolve_target("arachne-jetson://j1:5052,j2,[::1]:7000,j1:5052") == [
        Device("j1", 5052),
        Device("j2", 5051),
        Device("::1", 7000),
    ]
    for bad in ("arachne-jetson://j1:99999", "arachne-jetson://a b", "other://j1", "arachne-jetson://j1,,j2"):
        with pytest.raises(InvalidInputError):
            resolve_target(bad)


def test_cli_help_explains_uris_and_config():
    text = _cli("help", "-t", "arachne-jetson")
    for needle in ("arachne-jetson://HOST:PORT", "ARACHNE_DEVICE", "ARACHNE_TOKEN", "ARACHNE_TLS", "token=", "fleet"):
        assert needle in text


# -- the CLI, every sub-command -----------------------------------------------------------------
def test_cli_every_command(servers, registry, token_env, tmp_path, monkeypatch):
    target = _target(servers[0])
    out = _cli(
        "create", "-t", target, "--name", "cli-linear", "-m", "models:/dep-linear@champion", "-C", f"token={TOKEN}"
    )
    assert "arachne deployment cli-linear is created" in out

    listed = _cli("list", "-t", target)
    assert "'name': 'cli-linear'" in listed
    monkeypatch.setenv("ARACHNE_DEVICE", f"127.0.0.1:{servers[0].port}")
    assert _cli("list", "-t", "arachne-jetson") == listed  # the device from $ARACHNE_DEVICE

    got = _cli("get", "-t", f"arachne-jetson:/127.0.0.1:{servers[0].port}", "--name", "cli-linear")
    assert "registered_model: dep-linear" in got and "version: 1" in got and "alias: champion" in got
    assert f"run_id: {registry['run_id']}" in got and "runtime: onnx" in got and "deployed_at: " in got

    (tmp_path / "in.json").write_text(json.dumps({"inputs": X.tolist()}))
    printed = _cli("predict", "-t", target, "--name", "cli-linear", "--input-path", tmp_path / "in.json")
    np.testing.assert_allclose(json.loads(printed)["predictions"], registry["out1"], rtol=1e-6)

    result = CliRunner().invoke(
        commands,
        [
            "update",
            "-t",
            target,
            "--name",
            "cli-linear",
            "-m",
            "models:/dep-linear/2",
            "-C",
            f"token={TOKEN}",
            "-C",
            "progress=true",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Deployment cli-linear is updated (with flavor arachne)" in result.stdout
    assert "upload cli-linear" in result.stderr  # the progress bar
    _cli(
        "predict",
        "-t",
        target,
        "--name",
        "cli-linear",
        "--input-path",
        tmp_path / "in.json",
        "-O",
        tmp_path / "out.json",
    )
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    np.testing.assert_allclose(predictions, registry["out2"], rtol=1e-6)

    assert "Deployment cli-linear is deleted" in _cli("delete", "-t", target, "--name", "cli-linear")
    assert "cli-linear" not in _cli("list", "-t", target)
    # idempotent, as MLflow's BaseDeploymentClient contract asks
    assert "Deployment cli-linear is deleted" in _cli("delete", "-t", target, "--name", "cli-linear")


def test_cli_run_local(registry, mlflow_store, tmp_path):
    """`mlflow deployments run-local` as a real process: a device server in the foreground with the model."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "deployments",
        "run-local",
        "-t",
        "arachne-jetson",
        "--name",
        "local",
        "-m",
        "models:/dep-linear/1",
        "-C",
        f"port={port}",
        "-C",
        f"model_store={tmp_path / 'store'}",
        "-C",
        f"token={TOKEN}",
        "-C",
        "log_level=warning",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(tmp_path / "run-local.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with DeviceClient("127.0.0.1", port, token=TOKEN) as device:
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:  # polling a starting process: there is no event to wait on
                    assert process.poll() is None, (tmp_path / "run-local.log").read_text()
                    try:
                        if device.ready():
                            break
                    except Exception:  # noqa: BLE001  (not listening yet)
                        time.sleep(0.2)
                np.testing.assert_allclose(device.infer("local", {"x": X})["y"], registry["out1"], rtol=1e-6)
                assert device.model_record("local")["provenance"]["registered_model"] == "dep-linear"
        finally:
            process.terminate()
            process.wait(timeout=30)


# -- the Python API -----------------------------------------------------------------------------
def test_fleet_of_two(servers, registry, token_env):
    client = get_deploy_client(_target(*servers))
    result = client.create_deployment("fleet", f"runs:/{registry['run_id']}/model")
    assert result["flavor"] == "arachne" and result["run_id"] == registry["run_id"]
    assert [d["state"] for d in result["devices"]] == ["deployed", "deployed"]
    for server in servers:
        with _device(server) as device:
            np.testing.assert_allclose(device.infer("fleet", [X])["y"], registry["out1"], rtol=1e-6)

    deployment = client.get_deployment("fleet")
    assert [d["state"] for d in deployment["devices"]] == ["READY", "READY"]
    assert deployment["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [d["name"] for d in client.list_deployments()] == ["fleet"]
    assert [d["device"] for d in client.list_deployments()[0]["devices"]] == [f"127.0.0.1:{s.port}" for s in servers]

    again = client.update_deployment("fleet", f"runs:/{registry['run_id']}/model")
    assert [d["state"] for d in again["devices"]] == ["unchanged", "unchanged"]
    client.delete_deployment("fleet")
    assert client.list_deployments() == []
    with pytest.raises(MlflowException, match="no deployment 'fleet'"):
        client.get_deployment("fleet")


def test_fleet_with_a_device_down(servers, registry, token_env):
    down = free_port()
    fleet = get_deploy_client(_target(servers[0], down))
    get_deploy_client(_target(servers[0])).create_deployment("half", "models:/dep-linear/1")
    report = rf"1 of 2 devices with dep-linear v2; failed on 127\.0\.0\.1:{down}: .*unreachable"
    with pytest.raises(MlflowException, match=report):  # honest: a device lacks it
        fleet.update_deployment("half", "models:/dep-linear/2")
    result = fleet.update_deployment("half", "models:/dep-linear/2", config={"min_success": "1"})
    states = {d["device"]: d for d in result["devices"]}
    assert states[f"127.0.0.1:{servers[0].port}"]["state"] == "unchanged"  # it got v2 the first time
    assert states[f"127.0.0.1:{down}"]["state"] == "failed" and "unreachable" in states[f"127.0.0.1:{down}"]["error"]
    np.testing.assert_allclose(fleet.predict("half", X)["predictions"], registry["out2"], rtol=1e-6)
    described = {d["device"]: d for d in fleet.get_deployment("half")["devices"]}
    assert described[f"127.0.0.1:{down}"]["state"] == "unreachable"
    up_state = described[f"127.0.0.1:{servers[0].port}"]
    assert (up_state["state"], up_state["registered_model"], up_state["version"]) == ("READY", "dep-linear", "2")
    with pytest.raises(MlflowException, match=rf"0 of 1 devices .*failed on 127\.0\.0\.1:{down}"):
        get_deploy_client(_target(down)).update_deployment("half", "models:/dep-linear/1")
    # the ledger lists only failures for the down device: it never had the model, so it needs no cleaning
    fleet.delete_deployment("half")
    assert MlflowClient().get_registered_model("dep-linear").tags.get("arachne.deploy.half") is None


def test_update_while_predicting(servers, registry, token_env):
    client = get_deploy_client(_target(servers[0]))
    client.create_deployment("busy", "models:/dep-linear/1")
    failures, answers, stop = [], [], threading.Event()

    def keep_predicting():
        predictor = get_deploy_client(_target(servers[0]))
        while not stop.is_set():
            try:
                answers.append(np.asarray(predictor.predict("busy", X)["predictions"], dtype=np.float32))
            except Exception as err:  # noqa: BLE001  (every failure is recorded and fails the test)
                failures.append(err)

    thread = threading.Thread(target=keep_predicting)
    thread.start()
    try:
        for version in (2, 1, 2):
            client.update_deployment("busy", f"models:/dep-linear/{version}")
    finally:
        stop.set()
        thread.join()
    assert not failures and len(answers) > 3
    for answer in answers:
        assert np.allclose(answer, registry["out1"], rtol=1e-6) or np.allclose(answer, registry["out2"], rtol=1e-6)
    np.testing.assert_allclose(client.predict("busy", X)["predictions"], registry["out2"], rtol=1e-6)
    client.delete_deployment("busy")


def test_predict_input_forms(servers, registry, token_env, tmp_path):
    client = get_deploy_client(_target(servers[0]))
    client.create_deployment("two", registry["two"].model_uri)
    rng = np.random.default_rng(5)
    with _device(servers[0]) as device:
        specs = device.model_metadata("two")["inputs"]  # TFLite names: serving_default_b:0, serving_default_a:0
        inputs = {s["name"]: rng.standard_normal((2, s["shape"][1])).astype(np.float32) for s in specs}
        expected = device.infer("two", inputs)
    forms = [inputs, pd.DataFrame({k: list(v.astype(np.float64)) for k, v in inputs.items()})]
    (tmp_path / "in.json").write_text(json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}))
    forms.append(pd.read_json(tmp_path / "in.json"))  # what `mlflow deployments predict` passes
    for form in forms:
        response = client.predict("two", form)
        assert isinstance(response, PredictionsResponse) and set(response["predictions"]) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(response["predictions"][key], value, rtol=1e-6)
    client.delete_deployment("two")

    client.create_deployment("one", "models:/dep-linear/1")
    (tmp_path / "rows.json").write_text(json.dumps({"inputs": X.tolist()}))
    for form in (X, X.astype(np.float64), X.tolist(), pd.DataFrame(X), pd.read_json(tmp_path / "rows.json")):
        np.testing.assert_allclose(client.predict("one", form)["predictions"], registry["out1"], rtol=1e-6)
    client.delete_deployment("one")


def test_registry_uris(servers, registry, token_env, tmp_path):
    client = get_deploy_client(_target(servers[0]))
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/dep-linear/2", dst_path=str(tmp_path))
    for i, uri in enumerate(["models:/dep-linear@champion", "models:/dep-linear/2", registry["v1"].model_uri, local]):
        client.create_deployment(f"uri-{i}", uri)
    details = [client.get_deployment(f"uri-{i}") for i in range(4)]
    assert [details[0][k] for k in ("registered_model", "version", "alias")] == ["dep-linear", "1", "champion"]
    assert details[0]["run_id"] == registry["run_id"]
    assert details[1]["version"] == "2" and "run_id" not in details[1]
    assert details[2]["model_id"] == registry["v1"].model_id and "registered_model" not in details[2]
    assert details[3]["model_uri"] == local
    with _device(servers[0]) as device:
        stored = device.model_record("uri-0")
        assert stored["provenance"]["model_uri"] == "models:/dep-linear@champion"
    for i in range(4):
        client.delete_deployment(f"uri-{i}")


def test_https_from_config_and_environment(registry, tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    secured = ServerProcess(
        tmp_path / "store",
        token=TOKEN,
        ca_cert=str(cert),
        extra_args=["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
    ).start()
    try:
        client = get_deploy_client(_target(secured))
        config = {"token": TOKEN, "tls": "true", "ca_cert": str(cert)}
        result = client.create_deployment("secure", "models:/dep-linear/1", config=config)
        assert result["devices"][0]["state"] == "deployed"
        with pytest.raises(MlflowException, match="unreachable"):  # http to an https server
            client.update_deployment("secure", "models:/dep-linear/1", config={"token": TOKEN})
        monkeypatch.setenv("ARACHNE_TOKEN", TOKEN)
        monkeypatch.setenv("ARACHNE_TLS", "1")
        monkeypatch.setenv("ARACHNE_CA_CERT", str(cert))
        np.testing.assert_allclose(client.predict("secure", X)["predictions"], registry["out1"], rtol=1e-6)
        client.delete_deployment("secure")
    finally:
        secured.stop()


# -- refusals -----------------------------------------------------------------------------------
def test_refuses_model_without_arachne_flavor(servers, registry, token_env):
    client = get_deploy_client(_target(servers[0]))
    with pytest.raises(MlflowException, match=r"no 'arachne' flavor \(its flavors: \['onnx', 'python_function'\]\)"):
        client.create_deployment("plain", registry["plain"].model_uri)
    with pytest.raises(MlflowException, match="deploys the 'arachne' flavor, not 'onnx'"):
        client.create_deployment("plain", registry["v1"].model_uri, flavor="onnx")
    assert client.list_deployments() == []


def test_refuses_device_that_cannot_run_the_model(servers, registry, token_env, tmp_path, onnx_linear_file, tvm_linear):
    """Checked before anything is pushed: the runtime, and for TVM the CPU architecture and device."""
    client = get_deploy_client(_target(servers[0]))
    unknown = write_model_dir(tmp_path / "unknown", "no-such-runtime", onnx_linear_file, tvm_linear["model_spec"])
    with pytest.raises(MlflowException, match="has no 'no-such-runtime' runtime"):
        client.create_deployment("cannot", str(unknown))
    other_arch = "x86_64" if platform.machine() == "aarch64" else "aarch64"
    for key, value, message in (
        ("arch", other_arch, f"TVM model was compiled for {other_arch}"),
        ("device", "metal", "has no TVM device 'metal' \\(it has \\['cpu'"),
    ):
        model_dir = write_model_dir(
            tmp_path / key,
            "tvm",
            tvm_linear["model_file"],
            tvm_linear["model_spec"],
            params_file=tvm_linear["params_file"],
        )
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        mlmodel["flavors"]["arachne"]["tvm"][key] = value
        (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        with pytest.raises(MlflowException, match=message):
            client.create_deployment("cannot", str(model_dir))
    assert client.list_deployments() == []


def test_refuses_wrong_create_update_and_config(servers, registry, token_env):
    client = get_deploy_client(_target(servers[0]))
    with pytest.raises(MlflowException, match="no deployment 'nothing' to update"):
        client.update_deployment("nothing", "models:/dep-linear/1")
    client.create_deployment("twice", "models:/dep-linear/1")
    with pytest.raises(MlflowException, match="deployment 'twice' exists: the registry wants models:/dep-linear/1"):
        client.create_deployment("twice", "models:/dep-linear/1")
    with pytest.raises(MlflowException, match=r"unknown config \['tokn'\]"):
        client.delete_deployment("twice", config={"tokn": TOKEN})
    with pytest.raises(MlflowException, match="HTTP 401"):
        client.delete_deployment("twice", config={"token": "wrong"})
    client.delete_deployment("twice")
    with pytest.raises(MlflowException, match=r"unknown config \['prot'\]; run-local takes"):
        run_local("x", "models:/dep-linear/1", None, {"prot": "5051"})
    with pytest.raises(MlflowException, match="bad run-local config: argument --port"):
        run_local("x", "models:/dep-linear/1", None, {"port": "many"})


def test_quickstart_end_to_end(tmp_path):
    """The README's main job (`make quickstart`), in a fresh directory: its own store and device server."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "quickstart.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ARACHNE_"))}
    done = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all results agree (within 1e-05): True" in done.stdout
    # two devices in the fleet file's group, and `arachne-mlflow fleet status` on them
    assert re.search(r"quickstart-onnx: models:/arachne-quickstart-onnx@champion -> v1 on @lab", done.stdout)
    assert len(re.findall(r"\ncam-2 +v1 +v1 +READY +yes\n", done.stdout)) == 3 and "drift" not in done.stdout
    # one model, two variants: the device with LiteRT alone (cam-3, .venv-tflite) gets the TFLite build
    assert "variants chosen on @mixed: {'cam-1': 'onnx', 'cam-3': 'tflite'}" in done.stdout
    assert (tmp_path / "mlflow.db").is_file()


def test_the_package_and_the_fleet_command_line_import_no_mlflow():
    """MLflow loads `deployments.mlflow_plugin`; the package, the `fleet` parser and the fleet file's reader
    (which the remote runtime uses) import no MLflow."""
    code = (
        "import sys\n"
        "import arachne_mlflow.deployments, arachne_mlflow.deployments.commands, arachne_mlflow.fleet.inventory\n"
        "import arachne_mlflow.runtime.rpc_info\n"
        "from arachne_mlflow import cli\n"
        "cli.build_parser().parse_args(['fleet', 'sync', '--watch', '5'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
