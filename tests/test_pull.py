"""Pull mode (`serve --follow`): real `mlflow server` processes, real device servers following their aliases.

The tests talk to the tracking server with MLflow's own client; the device only with requests
(checked in the running device: it never imports mlflow).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from starlette.testclient import TestClient

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError, RegistryAuthError, RegistryError, RegistryUnavailableError
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.directory import read_model_dir
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.protocol import device_records, device_state
from arachne_mlflow.server.app import create_app
from arachne_mlflow.server.metrics import Metrics
from arachne_mlflow.server.pull.download import check_artifact_path
from arachne_mlflow.server.pull.follow import FollowConfig, Follower, parse_follows
from arachne_mlflow.server.pull.registry_client import ModelRef, RegistryClient, session_from_env
from arachne_mlflow.server.pull.smoke import smoke_inputs
from arachne_mlflow.server.store import ModelStore
from tests.helpers import models
from tests.helpers.mlflow_server import ADMIN, MlflowServer
from tests.helpers.servers import ServerProcess, free_port
from tests.helpers.waiting import wait_for

DEVICE = "cam-test"
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
NO_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None, "MLFLOW_TRACKING_TOKEN": None}
READER = ("fleet-reader", "reader-password-123")


# -- flags, URIs, credentials, names (no processes) ----------------------------------------------
def test_follow_flags_name_a_served_model_and_an_alias_or_version():
    follows = parse_follows(["det=models:/detector@prod", "cls=models:/my model/3"])
    assert follows == {"det": ModelRef("detector", alias="prod"), "cls": ModelRef("my model", version="3")}
    assert follows["det"].uri == "models:/detector@prod" and follows["cls"].uri == "models:/my model/3"
    for bad in ("det", "det=runs:/a/model", "det=models:/detector", "det=models:/detector/latest", "../x=models:/a@b"):
        with pytest.raises(InvalidInputError):
            parse_follows([bad])
    with pytest.raises(InvalidInputError, match="twice"):
        parse_follows(["det=models:/a@b", "det=models:/c@d"])


def test_credentials_and_tls_come_from_mlflows_variables():
    both = {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "t"}
    basic = session_from_env(both)
    assert basic.auth == ("u", "p") and "Authorization" not in basic.headers  # basic wins, as in MLflow
    token = session_from_env({"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem"})
    assert token.headers["Authorization"] == "Bearer t" and token.verify == "/etc/ca.pem"
    assert session_from_env({"MLFLOW_TRACKING_INSECURE_TLS": "TRUE"}).verify is False
    assert session_from_env({}).verify is True and session_from_env({}).auth is None
    clone = RegistryClient("http://mlflow:5000", basic).clone()  # (one per follower thread)
    assert clone.session is not basic and clone.session.auth == ("u", "p")
    for bad in (
        {"MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem"},
        {"MLFLOW_TRACKING_INSECURE_TLS": "yes please"},
        {"MLFLOW_TRACKING_USERNAME": "u"},
    ):
        with pytest.raises(InvalidInputError):
            session_from_env(bad)


def test_the_tracking_server_is_an_http_address_without_credentials_in_it():
    assert RegistryClient.from_env({"MLFLOW_TRACKING_URI": "https://mlflow.example:5000/"}).tracking_uri == (
        "https://mlflow.example:5000"
    )
    for uri in ("sqlite:///mlflow.db", "databricks", "http://user:secret@host:5000", "file:///tmp/mlruns"):
        with pytest.raises(InvalidInputError):
            RegistryClient.from_env({"MLFLOW_TRACKING_URI": uri})
    with pytest.raises(InvalidInputError, match="MLFLOW_TRACKING_URI"):
        RegistryClient.from_env({})


def test_file_names_from_a_downloaded_mlmodel_are_an_allow_list():
    for good in ("model.onnx", "sub/w.bin", "model_v2+int8.tflite", "input_example.json"):
        assert check_artifact_path(good) == good
    for bad in ("../x", "/etc/passwd", "a/../../b", ".hidden", "a\\b", "x\0y", "a;rm -rf", "", "a/" * 20 + "b"):
        with pytest.raises(InvalidInputError):
            check_artifact_path(bad)


class _Registry(http.server.BaseHTTPRequestHandler):
    """A hostile tracking server: redirects, answers too large or too slow, a 401 page."""

    def do_GET(self):
        if "alias=slow" in self.path:
            time.sleep(3)  # (the client has given up by then: no answer)
        elif "alias=moved" in self.path:
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.invalid/steal")
            self.end_headers()
        elif "alias=huge" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                self.wfile.write(b'{"model_version": {"name": "' + b"a" * (9 * 1024**2))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its cap
        else:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"<html>You are not authenticated</html>")

    def log_message(self, *args):
        pass


def test_the_registry_client_follows_no_redirect_and_bounds_what_it_reads():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = RegistryClient(f"http://127.0.0.1:{server.server_port}", session_from_env({}))
        with pytest.raises(RegistryError, match="redirected"):
            client.resolve(ModelRef("m", alias="moved"))
        with pytest.raises(RegistryError, match="over 8388608 bytes"):
            client.resolve(ModelRef("m", alias="huge"))
        with pytest.raises(RegistryAuthError, match="asks for credentials and none were set"):
            client.resolve(ModelRef("m", alias="prod"))
        client.timeout = (1.0, 0.5)  # (10 s and 60 s by default)
        with pytest.raises(RegistryUnavailableError, match="timed out"):
            client.resolve(ModelRef("m", alias="slow"))
    finally:
        server.shutdown()
        server.server_close()


def test_checks_wait_between_half_the_interval_and_the_interval_and_back_off_when_unreachable(tmp_path):
    store = ModelStore(tmp_path / "store")
    follower = Follower(
        "det", ModelRef("d", alias="a"), store, RegistryClient("http://127.0.0.1:9"), Metrics(), interval=10, device="x"
    )
    waits = [follower._delay(0) for _ in range(200)]
    assert 5 <= min(waits) and max(waits) <= 10 and max(waits) - min(waits) > 2  # jittered, never past the interval
    backed_off = [max(follower._delay(n) for _ in range(50)) for n in (1, 2, 3, 4, 8)]
    assert backed_off[0] <= 10 < backed_off[1] <= 20 < backed_off[2] <= 40 and backed_off[-1] <= 100  # capped


def test_smoke_inputs_come_from_the_saved_example_when_it_fits(tmp_path):
    specs = [TensorSpec.create("x", "float32", [-1, 4])]
    for i, saved in enumerate(([[1, 2, 3, 4]], {"x": [[1, 2, 3, 4]]}, {"inputs": [[1, 2, 3, 4]]})):
        (tmp_path / f"{i}.json").write_text(json.dumps(saved))
        (value,) = smoke_inputs(specs, tmp_path / f"{i}.json")
        np.testing.assert_array_equal(value, np.array([[1, 2, 3, 4]], dtype=np.float32))
    (tmp_path / "other.json").write_text(json.dumps({"columns": ["a"], "data": [[1]]}))
    (value,) = smoke_inputs(specs, tmp_path / "other.json")  # a DataFrame's example: random inputs instead
    assert value.shape == (1, 4) and value.dtype == np.float32


def test_a_followed_model_is_the_registrys_and_its_status_says_why_it_waits(tmp_path):
    """In-process, with a tracking server that is down: uploads and deletes are refused, status shows the error."""
    registry = RegistryClient(f"http://127.0.0.1:{free_port()}")
    follow = FollowConfig({"det": ModelRef("detector", alias="prod")}, registry, interval=0.2, device=DEVICE)
    with TestClient(create_app(str(tmp_path / "store"), follow=follow)) as client:
        metrics = wait_for(lambda: _metric(client.get("/metrics").text, "arachne_follow_failures_total", "check"))
        assert metrics >= 1
        answer = client.get("/v2/repository/models/det")
        error = answer.json()["error"]
        assert answer.status_code == 404 and "follows models:/detector@prod" in error and "cannot be reached" in error
        (entry,) = client.post("/v2/repository/index", content=b"{}").json()
        assert entry["name"] == "det" and entry["state"] == "UNAVAILABLE" and "cannot be reached" in entry["reason"]
        refused = client.put("/v2/repository/models/det", content=_tar({"MLmodel": b"flavors: {}"}))
        assert refused.status_code == 409 and "move the alias" in refused.json()["error"]
        assert client.delete("/v2/repository/models/det").status_code == 409
        assert client.put("/v2/repository/models/other", content=b"not a tar").status_code == 400  # others as before


# -- a real tracking server and real following devices --------------------------------------------
@pytest.fixture(scope="session")
def pull_models(tmp_path_factory):
    """Model dirs saved by the ONNX flavor (with an input example) and broken variants; expected outputs."""
    from arachne_mlflow.flavors import onnx as onnx_flavor

    root = tmp_path_factory.mktemp("pull-models")
    dirs, expected = {}, {}
    for key, scale in (("v1", 1.0), ("v2", -2.0), ("v3", 3.0)):
        model = models.onnx_linear("N", scale=scale)
        with arachne_runtime.init("onnx", model_content=model.SerializeToString()) as module:
            expected[key] = module.infer([X])[0]
        dirs[key] = root / key
        onnx_flavor.save_model(model, str(dirs[key]), input_example=X, pip_requirements=["arachne-mlflow"])
    dirs["corrupt"] = _variant(dirs["v1"], root / "corrupt", lambda d, _: (d / "model.onnx").write_bytes(b"\x08" * 64))
    dirs["traversal"] = _variant(dirs["v1"], root / "traversal", lambda _, f: f.update(model_file="../x.onnx"))

    def add_blob(directory, arachne):
        (directory / "blob.bin").write_bytes(np.random.default_rng(0).bytes(2 * 1024**2))
        arachne["extra_files"] = ["blob.bin"]

    dirs["big"] = _variant(dirs["v1"], root / "big", add_blob)
    dirs["missing"] = _variant(dirs["v1"], root / "missing", lambda _, f: f.update(extra_files=["absent.bin"]))
    dirs["writes"] = _variant(  # an option that would make onnxruntime write a file
        dirs["v1"], root / "writes", lambda _, f: f.update(runtime_options={"optimized_model_filepath": "/tmp/o.onnx"})
    )
    assert not np.allclose(expected["v1"], expected["v2"]) and not np.allclose(expected["v2"], expected["v3"])
    return dirs, expected


def _variant(source: Path, directory: Path, change) -> Path:
    shutil.copytree(source, directory)
    mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
    change(directory, mlmodel["flavors"]["arachne"])
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


@pytest.fixture
def start_device(tmp_path):
    """Start a device server that follows `follows` on `tracking_url` (its store under tmp_path unless given)."""
    started = []

    def start(tracking_url, *follows, interval=1.0, env=None, extra=(), store=None):
        args = [arg for follow in follows for arg in ("--follow", follow)]
        args += ["--follow-interval", str(interval), "--device-name", DEVICE, "--log-level", "info", *extra]
        server = ServerProcess(store or tmp_path / "store", extra_args=args, env=_environment(tracking_url, env))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _environment(tracking_url, extra=None):
    """This process's environment with the tracking server, no MLflow credentials unless `extra` has some."""
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_url, **NO_CREDENTIALS, **(extra or {})}
    return {key: value for key, value in environment.items() if value is not None}


def _client(tracking_url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_url)


def _register(client, registered_model: str, model_dir: Path) -> str:
    """Log `model_dir` as a run's artifacts and register it; the new version."""
    experiment = client.get_experiment_by_name("pull-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("pull-tests")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{registered_model}'"):
        client.create_registered_model(registered_model)
    return client.create_model_version(registered_model, f"{run.info.artifact_uri}/model", run.info.run_id).version


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _record(device, name="det"):
    answer = requests.get(f"{device.url}/v2/repository/models/{name}", timeout=10)
    return answer.json() if answer.status_code == 200 else None


def _running(device, name="det"):
    record = _record(device, name)
    return record and record["state"] == "READY" and record["provenance"].get("version")


def _rolled(device, version, name="det"):
    """The device runs `version` and its follower is done with it (state `following`)."""
    record = _record(device, name)
    return bool(record) and record["provenance"].get("version") == version and record["follow"]["state"] == "following"


def _follow(device, name="det"):
    return (_record(device, name) or {}).get("follow") or {}


def _infer(device, name="det"):
    with DeviceClient("127.0.0.1", device.port) as client:
        return client.infer(name, {"x": X})["y"]


def _device_run(client, registered_model, deployment="det", device=DEVICE):
    """The run holding `device`'s own record of `deployment` from `registered_model` (None if there is none)."""
    experiment = client.get_experiment_by_name(device_records.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], device_records.search_filter(deployment, device))
    return next((run for run in runs if run.data.tags.get(device_records.MODEL) == registered_model), None)


def _device_record(client, registered_model, deployment="det", device=DEVICE):
    """`device`'s own record of `deployment` (its entry, with its version; the time left out), {} if it has none."""
    run = _device_run(client, registered_model, deployment, device)
    entry = (device_records.parse_entry(run.data.tags) or {}) if run else {}
    return {key: value for key, value in entry.items() if key != "at"}


def _entry(state, revision=None):
    """A record's entry as compared (the time aside)."""
    return {"state": state, "revision": revision} if revision is not None else {"state": state}


def _metric(text: str, name: str, stage: str | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="det"' in line and (stage is None or f'stage="{stage}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _log(device) -> str:
    return (device.store.parent / f"server-{device.port}.log").read_text(errors="replace")


def _metrics(device) -> str:
    return requests.get(f"{device.url}/metrics", timeout=10).text


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
    return buffer.getvalue()


@pytest.mark.slow
def test_moving_the_alias_rolls_the_device_within_one_interval(mlflow_server, pull_models, start_device):
    dirs, expected = pull_models
    client, registered = _client(mlflow_server), _unique("rolls")
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    client.set_registered_model_alias(registered, "prod", v1)
    other = device_state.entry("deployed", "2026-01-01T00:00:00+00:00", revision=4)
    experiment = client.get_experiment_by_name(device_records.EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(device_records.EXPERIMENT)
    tags = {**device_records.identity_tags("det", "cam-other", registered), **device_records.record_tags(v2, other)}
    client.create_run(experiment_id, tags=tags)
    interval = 2.0
    follows = (f"det=models:/{registered}@prod", f"pinned=models:/{registered}/{v1}")  # an alias, a version
    device = start_device(mlflow_server, *follows, interval=interval)
    wait_for(lambda: _rolled(device, v1) and _rolled(device, v1, "pinned"))
    np.testing.assert_allclose(_infer(device), expected["v1"], rtol=1e-6)
    wait_for(lambda: _device_record(client, registered) == {"version": v1, **_entry("deployed", 1)})  # after "pulling"

    moved = time.monotonic()
    client.set_registered_model_alias(registered, "prod", v2)
    wait_for(lambda: _follow(device).get("latest_version") == v2)
    assert time.monotonic() - moved < interval + 5  # seen at the next check (the margin covers a loaded machine)
    wait_for(lambda: _rolled(device, v2))
    np.testing.assert_allclose(_infer(device), expected["v2"], rtol=1e-6)

    record = _record(device)
    assert record["revision"] == 2 and record["provenance"]["alias"] == "prod"
    assert record["digest"] == files_digest(dirs["v2"], read_model_dir(dirs["v2"]).files())  # the push path's digest
    follow = record["follow"]
    assert follow["state"] == "following" and follow["version"] == v2 and follow["last_error"] is None
    assert follow["model_uri"] == f"models:/{registered}@prod" and follow["last_success"]
    wait_for(lambda: _device_record(client, registered) == {"version": v2, **_entry("deployed", 2)})
    assert _device_record(client, registered, device="cam-other") == {
        "version": v2,
        **_entry("deployed", 4),
    }  # its own, untouched
    assert _running(device, "pinned") == v1 and _record(device, "pinned")["revision"] == 1
    assert _device_record(client, registered, "pinned") == {"version": v1, **_entry("deployed", 1)}
    metrics = _metrics(device)
    assert _metric(metrics, "arachne_follow_updates_total") == 2
    assert _metric(metrics, "arachne_follow_last_success_timestamp_seconds") > time.time() - 60


@pytest.mark.slow
def test_a_push_to_a_following_device_leaves_it_to_pull(tracking_server, pull_models, start_device):
    """A fleet command that reaches a device following the URI it deploys pushes nothing: the device
    is `unchanged` when it runs that version, `pulling` while it has yet to; a device following
    another URI is a failure that names it."""
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    from arachne_mlflow.deployments.desired_state import DesiredState

    dirs, _ = pull_models
    client, registered = _client(tracking_server), _unique("pushed")
    name = _unique("det")  # (other tests record deployments named det in the session's registry)
    v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
    client.set_registered_model_alias(registered, "prod", v1)
    device = start_device(tracking_server, f"{name}=models:/{registered}@prod", interval=60.0)  # no check meanwhile
    wait_for(lambda: _rolled(device, v1, name))
    deploy = get_deploy_client(f"arachne-jetson://127.0.0.1:{device.port}")
    states = lambda result: [d["state"] for d in result["devices"]]  # noqa: E731
    # a fleet of pulling devices is recorded with `create`, as docs/deployments.md says
    assert states(deploy.create_deployment(name, f"models:/{registered}@prod", config={"report": "false"})) == [
        "unchanged"
    ]
    desired = DesiredState(client).find(name)
    assert (desired.registered_model, desired.model_uri) == (registered, f"models:/{registered}@prod")
    client.set_registered_model_alias(registered, "prod", v2)
    assert states(deploy.update_deployment(name, f"models:/{registered}@prod", config={"report": "false"})) == [
        "pulling"
    ]
    with pytest.raises(MlflowException, match=f"follows models:/{registered}@prod"):
        deploy.update_deployment(name, f"models:/{registered}/{v2}", config={"report": "false"})
    assert _record(device, name)["revision"] == 1 and _running(device, name) == v1  # nothing was pushed
    client.delete_registered_model(registered)  # and its desired state: `fleet sync` of everything skips it


@pytest.mark.slow
def test_a_version_that_fails_leaves_the_old_one_serving_is_reported_and_not_retried(
    mlflow_server, pull_models, start_device
):
    dirs, expected = pull_models
    client, registered = _client(mlflow_server), _unique("fails")
    v1 = _register(client, registered, dirs["v1"])
    client.set_registered_model_alias(registered, "prod", v1)
    device = start_device(mlflow_server, f"det=models:/{registered}@prod", extra=["--max-upload-mb", "1"])
    wait_for(lambda: _rolled(device, v1))
    bad = {
        "corrupt": "failed its smoke test",  # does not load
        "traversal": "leaves the model directory",  # MLmodel names a file outside
        "big": "over the limit",  # 2 MiB of files, the device takes 1 MiB
        "writes": "may not set options that name files",  # refused before any process loads it
        "missing": "has no file 'absent.bin'",  # MLmodel names a file the registry does not have
    }
    for key, why in bad.items():
        version = _register(client, registered, dirs[key])
        client.set_registered_model_alias(registered, "prod", version)
        follow = wait_for(lambda: (f := _follow(device)).get("failed_version") == version and f)
        assert follow["state"] == "failed" and why in follow["last_error"], follow
        assert _running(device) == v1
        np.testing.assert_allclose(_infer(device), expected["v1"], rtol=1e-6)
        failed = {"version": version, "state": "failed"}
        entry = wait_for(lambda: (e := _device_record(client, registered)).items() >= failed.items() and e)
        assert why in entry["error"]
    time.sleep(4)  # several more checks: a failed version is not tried again while the alias stays
    assert _metric(_metrics(device), "arachne_follow_failures_total", "version") == len(bad)
    assert _record(device)["revision"] == 1
    assert not list((device.store / ".follow" / "det").glob("v*"))  # nothing of the failed downloads left
    assert not (device.store.parent / "x.onnx").exists() and not Path("/tmp/o.onnx").exists()

    v3 = _register(client, registered, dirs["v3"])
    client.set_registered_model_alias(registered, "prod", v3)
    wait_for(lambda: _rolled(device, v3))
    np.testing.assert_allclose(_infer(device), expected["v3"], rtol=1e-6)
    assert _follow(device)["failed_version"] is None


@pytest.mark.slow
def test_a_followed_model_survives_a_device_restart(mlflow_server, pull_models, start_device):
    dirs, expected = pull_models
    client, registered = _client(mlflow_server), _unique("restart")
    v1 = _register(client, registered, dirs["v1"])
    client.set_registered_model_alias(registered, "prod", v1)
    follow = f"det=models:/{registered}@prod"
    device = start_device(mlflow_server, follow)
    wait_for(lambda: _rolled(device, v1))
    first = _record(device)
    device.stop()

    down = start_device(f"http://127.0.0.1:{free_port()}", follow, store=device.store)  # registry unreachable
    np.testing.assert_allclose(_infer(down), expected["v1"], rtol=1e-6)  # served from the store at once
    status = wait_for(lambda: (f := _follow(down)).get("last_error") and f)
    assert status["state"] == "error" and "cannot be reached" in status["last_error"] and status["version"] == v1
    down.stop()

    back = start_device(mlflow_server, follow, store=device.store)
    wait_for(lambda: _follow(back).get("state") == "following")
    again = _record(back)
    assert (again["revision"], again["digest"], again["uploaded_at"]) == (
        first["revision"],
        first["digest"],
        first["uploaded_at"],
    )  # nothing downloaded again


PROBE = """
import json, pathlib, sys, threading, time

out = pathlib.Path(sys.argv[1])


def dump():
    while not (out / "dump").exists():
        time.sleep(0.1)
    (out / "modules.json").write_text(json.dumps(sorted(sys.modules)))


threading.Thread(target=dump, daemon=True).start()
from arachne_mlflow.server.main import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_following_device_never_imports_mlflow(mlflow_server, pull_models, tmp_path):
    """The real server (the CLI's main) with a thread that writes its sys.modules once it has pulled a model."""
    dirs, _ = pull_models
    client, registered = _client(mlflow_server), _unique("no-mlflow")
    version = _register(client, registered, dirs["v1"])
    client.set_registered_model_alias(registered, "prod", version)
    (tmp_path / "modules_probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    device = ServerProcess(
        tmp_path / "store",
        command=("modules_probe", str(out)),
        extra_args=["--follow", f"det=models:/{registered}@prod", "--follow-interval", "1"],
        env=_environment(mlflow_server, {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}),
    ).start()
    try:
        wait_for(lambda: _running(device))
        wait_for(lambda: _device_record(client, registered, device=None).get("version") == version)  # its state too
        (out / "dump").touch()
        modules = json.loads(wait_for(lambda: (out / "modules.json").is_file() and (out / "modules.json").read_text()))
    finally:
        device.stop()
    assert "arachne_mlflow.server.pull.follow" in modules and "requests" in modules  # the follower ran here
    assert [m for m in modules if m == "mlflow" or m.startswith("mlflow.")] == []


class DroppingProxy:
    """A TCP proxy to the tracking server that cuts the first connection once it has carried `after`
    bytes of answers, and keeps what the device sent (to see its Range requests)."""

    def __init__(self, target_port: int, after: int):
        self.target_port, self.after = target_port, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source, sink, answers):
        carried = 0
        try:
            while data := source.recv(65536):
                if not answers:
                    self.sent += data
                elif not self.dropped.is_set() and carried + len(data) > self.after:
                    sink.sendall(data[: self.after - carried])
                    self.dropped.set()
                    break
                carried += len(data)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self):
        self.listener.close()


@pytest.mark.slow
def test_a_download_cut_by_a_dropped_link_resumes_where_it_stopped(mlflow_server, pull_models, start_device):
    dirs, _ = pull_models
    client, registered = _client(mlflow_server), _unique("resume")
    version = _register(client, registered, dirs["big"])
    client.set_registered_model_alias(registered, "prod", version)
    proxy = DroppingProxy(int(mlflow_server.rsplit(":", 1)[1]), after=1024**2)  # halfway through blob.bin
    try:
        device = start_device(f"http://127.0.0.1:{proxy.port}", f"det=models:/{registered}@prod")
        wait_for(lambda: _rolled(device, version))
    finally:
        proxy.close()
    assert proxy.dropped.is_set()
    assert b"Range: bytes=" in proxy.sent and b"If-Range: " in proxy.sent  # resumed, not started again
    assert _record(device)["digest"] == files_digest(dirs["big"], read_model_dir(dirs["big"]).files())
    assert _metric(_metrics(device), "arachne_follow_failures_total", "download") >= 1


@pytest.mark.slow
def test_the_device_keeps_serving_through_a_registry_outage_and_catches_up(pull_models, start_device, tmp_path):
    dirs, expected = pull_models
    registry = MlflowServer(tmp_path / "mlflow").start()
    try:
        client, registered = _client(registry.url), _unique("outage")
        v1, v2 = _register(client, registered, dirs["v1"]), _register(client, registered, dirs["v2"])
        client.set_registered_model_alias(registered, "prod", v1)
        device = start_device(registry.url, f"det=models:/{registered}@prod")
        wait_for(lambda: _rolled(device, v1))

        registry.stop()
        wait_for(lambda: "cannot be reached" in (_follow(device).get("last_error") or ""))
        for _ in range(5):
            np.testing.assert_allclose(_infer(device), expected["v1"], rtol=1e-6)
            time.sleep(0.5)
        assert _follow(device)["state"] == "error"
        assert _metric(_metrics(device), "arachne_follow_failures_total", "check") >= 1

        registry.start()  # the same port and database
        restarted = _follow(device)["last_check"]
        client.set_registered_model_alias(registered, "prod", v2)
        wait_for(lambda: _rolled(device, v2))
        np.testing.assert_allclose(_infer(device), expected["v2"], rtol=1e-6)
        follow = _follow(device)
        assert follow["state"] == "following" and follow["last_success"] > restarted
    finally:
        registry.stop()


# -- MLflow's basic-auth app: a read-only user per fleet --------------------------------------------
@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory, pull_models):
    """A basic-auth tracking server (no permissions by default), a registered model, a user that may only READ it."""
    dirs, _ = pull_models
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), basic_auth=True).start()
    registered = _unique("auth")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        client = _client(server.url)
        client.set_registered_model_alias(registered, "prod", _register(client, registered, dirs["v1"]))
        client.create_experiment(device_records.EXPERIMENT)  # the admin's: fleet users get EDIT on it, or nothing
    for route, body in (
        ("/api/2.0/mlflow/users/create", {"username": READER[0], "password": READER[1]}),
        (
            "/api/3.0/mlflow/users/permissions/grant",
            {"username": READER[0], "resource_type": "registered_model", "resource_id": registered}
            | {"permission": "READ"},
        ),
    ):
        answer = requests.post(server.url + route, json=body, auth=ADMIN, timeout=30)
        assert answer.status_code == 200, answer.text
    yield server, registered
    server.stop()


def _reader_env(password=READER[1]):
    return {"MLFLOW_TRACKING_USERNAME": READER[0], "MLFLOW_TRACKING_PASSWORD": password}


@pytest.mark.slow
def test_a_read_only_user_can_follow_and_its_state_is_only_logged(
    auth_registry, pull_models, start_device, monkeypatch
):
    server, registered = auth_registry
    _, expected = pull_models
    assert (
        requests.get(  # the user cannot even list the experiment's artifacts: READ on the model only
            server.url + "/api/2.0/mlflow-artifacts/artifacts", params={"path": "1"}, auth=READER, timeout=30
        ).status_code
        == 403
    )
    device = start_device(server.url, f"det=models:/{registered}@prod", env=_reader_env())
    wait_for(lambda: _rolled(device, "1"))
    np.testing.assert_allclose(_infer(device), expected["v1"], rtol=1e-6)
    assert _follow(device)["last_error"] is None
    wait_for(lambda: "read-only" in _log(device))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    assert _device_run(_client(server.url), registered) is None  # nothing written with read-only credentials


@pytest.mark.slow
def test_a_wrong_password_is_a_clear_error_in_the_log_and_the_status(auth_registry, start_device):
    server, registered = auth_registry
    device = start_device(server.url, f"det=models:/{registered}@prod", env=_reader_env("not-the-password"))
    url = f"{device.url}/v2/repository/models/det"
    answer = wait_for(lambda: "401" in (a := requests.get(url, timeout=10)).text and (a,))[0]  # (a 404 is falsy)
    assert answer.status_code == 404 and "MLFLOW_TRACKING_PASSWORD" in answer.json()["error"]
    (entry,) = requests.post(f"{device.url}/v2/repository/index", data=b"{}", timeout=10).json()
    assert entry["state"] == "UNAVAILABLE" and "refused the credentials (401 Unauthorized)" in entry["reason"]
    log = wait_for(lambda: "refused the credentials" in (text := _log(device)) and text)
    assert "ERROR" in log and "MLFLOW_TRACKING_USERNAME" in log and "not-the-password" not in log
