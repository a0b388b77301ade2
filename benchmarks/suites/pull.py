"""Pull mode at scale, against a real `mlflow server` (sqlite, one worker) on loopback.

- poll: the tracking server's CPU per poll (the alias lookup, and the device reading its own
  record back), its requests and the bytes a poll downloads, with 10,000 device records in the
  fleet experiment (--quick: 200), beside the bytes the alias answer had with the old per-version
  JSON tag of every device (written as the old code wrote it, summarized at 100,000 characters)
  and with one version tag per device (measured with 500, --quick 50, grown linearly: such an answer grows with
  the fleet). Target: a poll's bytes independent of N.
- basic auth: CPU per poll with MLflow's basic-auth app, credential cache off (its default) and on
  (`auth_cache_ttl_seconds = 60`).
- write / status: the CPU and requests of one device writing its record; `fleet status`'s read of
  every record (`DesiredState.device_records`, pages of 1,000): seconds, pages, bytes.
- install: requests and tracking-server CPU of one real install (a `Follower` with its own store).
- converge: 200 light followers (--quick: 25) each making a device's requests (resolve, read its
  record, write pulling, write deployed), all at once after the alias moves; records that do not say
  what their device last wrote, read back through `fleet status`'s reader. Target 0.

The 10,000 records are seeded through MLflow's store (the same rows a device's requests make),
so that the suite runs in minutes on a small machine; every cost is measured over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.servers import free_port, wait_ready

TARGET_WRONG = 0
_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
ADMIN = ("admin", "admin-password-123")


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    records, followers, polls = (200, 25, 50) if quick else (10_000, 200, 300)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arachne-bench-pull-") as tmp:
        root = Path(tmp)
        with _server(root / "open") as (url, pid):
            registered = _register(url, models["tiny/onnx"]["model_file"])
            _seed(url, root / "open" / "mlflow.db", registered, records)
            rows.append(_poll(url, pid, registered, records, polls))
            rows.append(_old_tag_bytes(url, registered, records))
            rows.append(_per_key_bytes(url, registered, records, 50 if quick else 500))
            rows.append(_write(url, pid, registered, polls))
            rows.append(_status(url, pid, registered, records))
            rows.append(_install(url, pid, registered, root))
            rows.append(_converge(url, registered, followers, root))
        for ttl in (0, 60):
            with _server(root / f"auth-{ttl}", auth_ttl=ttl) as (url, pid):
                rows.append(_auth_poll(url, pid, models["tiny/onnx"]["model_file"], ttl, polls))
    return rows


# -- the tracking server -------------------------------------------------------------------
@contextlib.contextmanager
def _server(root: Path, auth_ttl: int | None = None):
    root.mkdir(parents=True)
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    args += ["--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, **_ENV}
    if auth_ttl is not None:
        (root / "auth.ini").write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
            f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\nauth_cache_ttl_seconds = {auth_ttl}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        args += ["--app-name", "basic-auth"]
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "bench"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def _cpu(group: int) -> float:
    """CPU seconds (user + system) of every process in the process group `group`, from /proc."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group:
                    ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _client(url: str, auth: tuple[str, str] | None = None):
    from mlflow import MlflowClient

    if auth:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = auth
    return MlflowClient(url)


def _register(url: str, onnx_file: str, auth: tuple[str, str] | None = None) -> str:
    import mlflow

    from arachne_mlflow.flavors import onnx as arachne_onnx

    client = _client(url, auth)
    mlflow.set_tracking_uri(url)
    try:
        name = "pull-bench"
        for _ in range(2):
            arachne_onnx.log_model(onnx_file, name="model", registered_model_name=name)
        client.set_registered_model_alias(name, "prod", "1")
        return name
    finally:
        mlflow.set_tracking_uri(None)


def _seed(url: str, database: Path, registered: str, count: int) -> None:
    """`count` device records of deployment `det` on v1 (MLflow's store, straight into the server's database)."""
    from mlflow.entities import RunTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from arachne_mlflow.protocol import device_records, device_state

    client = _client(url)
    experiment = client.create_experiment(device_records.EXPERIMENT)
    store = SqlAlchemyStore(f"sqlite:///{database}", str(database.parent / "artifacts"))
    entry = device_state.entry("deployed", "2026-12-07T00:00:00.000+00:00", revision=1)
    for i in range(count):
        device = f"sim-{i:05d}"
        tags = {**device_records.identity_tags("det", device, registered), **device_records.record_tags("1", entry)}
        run = store.create_run(experiment, "", int(time.time() * 1000), [], device_records.run_name("det", device))
        store.log_batch(run.info.run_id, [], [], [RunTag(k, v) for k, v in tags.items()])


# -- the rows ------------------------------------------------------------------------------
def _counted(registry) -> list[int]:
    """[requests, bytes] the registry client's session makes and downloads from now on."""
    counts = [0, 0]

    def count(response, *args, **kwargs):
        counts[0] += 1
        counts[1] += int(response.headers.get("Content-Length") or 0)  # (streamed: not read here)

    registry.session.hooks["response"].append(count)
    return counts


def _device(url: str, registered: str, device: str, directory: Path, auth=None):
    from arachne_mlflow.server.pull.registry_client import ModelRef, RegistryClient, session_from_env
    from arachne_mlflow.server.pull.report import RunReporter

    env = {"MLFLOW_TRACKING_USERNAME": auth[0], "MLFLOW_TRACKING_PASSWORD": auth[1]} if auth else {}
    registry = RegistryClient(url, session_from_env(env))
    directory.mkdir(parents=True, exist_ok=True)
    return registry, RunReporter("det", device, registered, registry, directory), ModelRef(registered, alias="prod")


def _poll(url: str, pid: int, registered: str, records: int, polls: int) -> dict:
    registry, reporter, ref = _device(url, registered, "sim-00000", Path(tempfile.mkdtemp()))
    reporter.report("1", "deployed", revision=1)  # (finds its seeded run)
    counts = _counted(registry)
    before = _cpu(pid)
    for _ in range(polls):
        mv = registry.resolve(ref)
        reporter.report(mv.version, "deployed", revision=1)
    cpu_ms = (_cpu(pid) - before) / polls * 1000
    answer = requests.get(f"{url}/api/2.0/mlflow/registered-models/alias", params={"name": registered, "alias": "prod"})
    return {
        "suite": "pull",
        "case": f"poll at {records} records",
        "server_cpu_ms": round(cpu_ms, 2),
        "requests": counts[0] / polls,
        "bytes": round(counts[1] / polls),
        "alias_answer_bytes": len(answer.content),
        "target": "bytes independent of N",
    }


def _old_tag_bytes(url: str, registered: str, records: int) -> dict:
    from arachne_mlflow.protocol import device_state

    entries = {
        f"sim-{i:05d}": device_state.entry("deployed", "2026-12-07T00:00:00.000+00:00", revision=1)
        for i in range(records)
    }
    client = _client(url)
    client.set_model_version_tag(registered, "2", "arachne.devices.det", device_state.fit_version_tag(entries))
    answer = requests.get(f"{url}/api/2.0/mlflow/model-versions/get", params={"name": registered, "version": "2"})
    client.delete_model_version_tag(registered, "2", "arachne.devices.det")
    return {"suite": "pull", "case": f"old: one JSON tag, {records} devices", "alias_answer_bytes": len(answer.content)}


def _per_key_bytes(url: str, registered: str, records: int, sample: int) -> dict:
    client = _client(url)
    entry = json.dumps({"state": "deployed", "at": "2026-12-07T00:00:00.000+00:00", "revision": 1})
    empty = len(
        requests.get(f"{url}/api/2.0/mlflow/model-versions/get", params={"name": registered, "version": "2"}).content
    )
    for i in range(sample):
        client.set_model_version_tag(registered, "2", f"arachne.devices.det.sim-{i:05d}", entry)
    full = len(
        requests.get(f"{url}/api/2.0/mlflow/model-versions/get", params={"name": registered, "version": "2"}).content
    )
    for i in range(sample):
        client.delete_model_version_tag(registered, "2", f"arachne.devices.det.sim-{i:05d}")
    return {
        "suite": "pull",
        "case": f"per-device version tags, {records} devices (from {sample})",
        "alias_answer_bytes": round(empty + (full - empty) / sample * records),
    }


def _write(url: str, pid: int, registered: str, writes: int) -> dict:
    registry, reporter, _ = _device(url, registered, "sim-00001", Path(tempfile.mkdtemp()))
    reporter.report("1", "deployed", revision=1)
    counts = _counted(registry)
    before = _cpu(pid)
    for i in range(writes):
        reporter.report("1", "deployed", revision=2 + i)  # a change each time: read back, then written
    return {
        "suite": "pull",
        "case": "write own record",
        "server_cpu_ms": round((_cpu(pid) - before) / writes * 1000, 2),
        "requests": counts[0] / writes,
    }


def _status(url: str, pid: int, registered: str, records: int) -> dict:
    from arachne_mlflow.deployments.desired_state import Desired, DesiredState

    state = DesiredState(_client(url))
    before_cpu, started = _cpu(pid), time.perf_counter()
    found = state.device_records(Desired("det", registered, f"models:/{registered}@prod", "@all"))
    seconds = time.perf_counter() - started
    return {
        "suite": "pull",
        "case": f"fleet status reads {records} records",
        "seconds": round(seconds, 2),
        "server_cpu_s": round(_cpu(pid) - before_cpu, 2),
        "pages": -(-records // 1000),
        "records": len(found),
    }


def _install(url: str, pid: int, registered: str, root: Path) -> dict:
    from arachne_mlflow.server.metrics import Metrics
    from arachne_mlflow.server.pull.follow import Follower
    from arachne_mlflow.server.store import ModelStore

    registry, _, ref = _device(url, registered, "installer", root / "installer")
    follower = Follower("det", ref, ModelStore(root / "installer" / "store"), registry, Metrics(), device="installer")
    counts = _counted(registry)
    before = _cpu(pid)
    follower.check()
    return {
        "suite": "pull",
        "case": "one install (tiny ONNX)",
        "server_cpu_ms": round((_cpu(pid) - before) * 1000, 1),
        "requests": counts[0],
        "state": follower.status()["state"],
    }


def _converge(url: str, registered: str, count: int, root: Path) -> dict:
    from arachne_mlflow.deployments.desired_state import Desired, DesiredState

    devices = [_device(url, registered, f"conv-{i:04d}", root / f"conv-{i:04d}") for i in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: d[1].report("1", "deployed", revision=1), devices))
        _client(url).set_registered_model_alias(registered, "prod", "2")
        started = time.perf_counter()

        def follow(device):
            registry, reporter, ref = device
            mv = registry.resolve(ref)
            reporter.report(mv.version, "pulling")
            reporter.report(mv.version, "deployed", revision=2)

        list(pool.map(follow, devices))
        seconds = time.perf_counter() - started
    records = DesiredState(_client(url)).device_records(Desired("det", registered, "models:/x@prod", "@all"))
    wrong = sum(
        1
        for _, reporter, _ in devices
        if (records.get(reporter.device) or {}).get("version") != "2"
        or records[reporter.device].get("state") != "deployed"
        or records[reporter.device].get("revision") != 2
    )
    return {
        "suite": "pull",
        "case": f"{count} followers converge at once",
        "seconds": round(seconds, 2),
        "wrong_records": wrong,
        "target": "0 wrong",
        "met": wrong == TARGET_WRONG,
    }


def _auth_poll(url: str, pid: int, onnx_file: str, ttl: int, polls: int) -> dict:
    registered = _register(url, onnx_file, auth=ADMIN)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(name, None)
    registry, _, ref = _device(url, registered, "auth", Path(tempfile.mkdtemp()), auth=ADMIN)
    registry.resolve(ref)
    before = _cpu(pid)
    for _ in range(polls):
        registry.resolve(ref)
    return {
        "suite": "pull",
        "case": f"alias lookup, basic auth, auth_cache_ttl_seconds={ttl}",
        "server_cpu_ms": round((_cpu(pid) - before) / polls * 1000, 2),
    }
