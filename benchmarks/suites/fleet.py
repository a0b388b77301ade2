"""Fleets: N real device servers on loopback, each with its own store, driven through the plugin.

For each N (1, 8, 32, 100; --quick: 1, 4), on the first N of a pool of servers named in a fleet
file (group @bench), with the tiny ONNX model (two versions, other weights) in a local MLflow registry (sqlite):
- push: `create` to every device (streaming the model and each device loading it),
- update unchanged: `update` with the same model URI (every device answers "unchanged"),
- status: `fleet status` of the deployment (the registry, then every device asked at once),
- sync: `fleet sync` after the alias moved to another version (a push to every device),
- sync unchanged: `fleet sync` again (nothing to do),
- rollback: `fleet rollback` (every device serves the version it kept again, from its own disk).
Pushes and syncs take the default strategy (rolling, 25% of the devices a batch, each device gated by
a smoke inference before the next batch starts).
Each row has the client's wall time, its CPU seconds per device (this process, all its threads:
on a 2-core machine the devices' own CPU dominates wall time) and the growth of its resident
memory at the peak, and the slowest device's own seconds. Targets: update-unchanged of 100 devices
<= 5 s, status of 100 <= 2 s.

`ARACHNE_BENCH_DEVICE_PYTHON` names the interpreter of an environment with what a device installs
(`pip install "arachne-mlflow[device-onnx]"`) to run the device servers with; by default they run
with this interpreter and everything installed here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.models import CACHE, tiny_onnx
from benchmarks.servers import device_servers, rss_mb

TARGETS = {"update unchanged": 5.0, "status": 2.0}  # seconds, for 100 devices
TARGET_DEVICES = 100


def run(models: dict[str, dict], quick: bool) -> list[dict]:
    sizes = (1, 4) if quick else (1, 8, 32, 100)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="arachne-bench-fleet-") as tmp:
        root = Path(tmp)
        stores = [root / f"device-{i}" / "store" for i in range(max(sizes))]
        versions = [models["tiny/onnx"]["model_file"], str(tiny_onnx(CACHE / "tiny_seed2.onnx", seed=2))]
        with (
            _registry(root, versions) as registry,
            device_servers(
                stores, extra=("--workers", "1"), python=os.environ.get("ARACHNE_BENCH_DEVICE_PYTHON")
            ) as ports,
        ):
            for n in sizes:
                rows += _round(root, registry, ports[:n])
    return rows


@contextlib.contextmanager
def _registry(root: Path, versions: list[str]):
    """A local MLflow registry with `fleet-bench` v1, v2, ... from the ONNX files `versions`; the
    tracking URI and experiment of the process come back afterwards."""
    import mlflow

    from arachne_mlflow.flavors import onnx as arachne_onnx

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_experiment = mlflow.tracking.fluent._active_experiment_id
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("fleet", (root / "artifacts").as_uri()))
        for onnx_file in versions:
            arachne_onnx.log_model(onnx_file, name="model", registered_model_name="fleet-bench")
        client = mlflow.MlflowClient()
        yield client
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.tracking.fluent._active_experiment_id = previous_experiment
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def _round(root: Path, registry, ports: list[int]) -> list[dict]:
    from mlflow.deployments import get_deploy_client

    from arachne_mlflow.deployments.desired_state import DesiredState
    from arachne_mlflow.deployments.operations import sync
    from arachne_mlflow.deployments.rollback import rollback
    from arachne_mlflow.deployments.status import status
    from arachne_mlflow.deployments.targets import settings

    n = len(ports)
    name = f"bench-{n}"
    fleet = root / f"fleet-{n}.yaml"
    devices = {f"dev-{i}": {"address": f"127.0.0.1:{port}"} for i, port in enumerate(ports)}
    fleet.write_text(yaml.safe_dump({"devices": devices, "groups": {"bench": list(devices)}}))
    registry.set_registered_model_alias("fleet-bench", "champion", "1")
    config = {"fleet": str(fleet), "report": "false"}
    options = settings(config)
    client = get_deploy_client("arachne-jetson://@bench")
    uri = "models:/fleet-bench@champion"

    def move_alias_then_sync():
        registry.set_registered_model_alias("fleet-bench", "champion", "2")
        return sync([name], options, DesiredState(registry))

    steps = [
        ("push", lambda: client.create_deployment(name, uri, config=config), _all_states("deployed")),
        ("update unchanged", lambda: client.update_deployment(name, uri, config=config), _all_states("unchanged")),
        ("status", lambda: status([name], options, DesiredState(registry)), _all_in_sync),
        ("sync", move_alias_then_sync, _synced("deployed")),
        ("sync unchanged", lambda: sync([name], options, DesiredState(registry)), _synced("unchanged")),
        ("rollback", lambda: [rollback(name, None, options, DesiredState(registry))], _synced("rolled-back")),
    ]
    rows = []
    for step, action, check in steps:
        seconds, cpu, growth, result = _measure(action)
        problem = check(result, n)
        target = TARGETS.get(step)
        row = {
            "suite": "fleet",
            "case": f"{step}, {n} devices",
            "seconds": seconds,
            "client_cpu_s_per_device": cpu / n,
            "client_peak_growth_mb": growth,
            "errors": 0 if problem is None else 1,
        }
        slowest = _slowest(result)
        if slowest is not None:
            row["slowest_device_s"] = slowest
        if target is not None and n == TARGET_DEVICES:
            row["target"] = f"<= {target:g} s for {TARGET_DEVICES} devices"
            row["met"] = seconds <= target and problem is None
        if problem is not None:
            row["problem"] = problem
        rows.append(row)
    client.delete_deployment(name, config=config)
    return rows


def _measure(action) -> tuple[float, float, float, object]:
    """Wall seconds, CPU seconds (this process) and peak RSS growth (MB) of `action()`."""
    pid = os.getpid()
    before = rss_mb(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu, start = time.process_time(), time.perf_counter()
    try:
        result = action()
    finally:
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        done.set()
        sampler.join()
    return seconds, cpu, peak[0] - before, result


def _slowest(result) -> float | None:
    """The longest a device of this step took (None for `status`, which does not time devices)."""
    from arachne_mlflow.deployments.operations import Outcome

    if isinstance(result, dict):  # the plugin's answer
        return max(d["seconds"] for d in result["devices"])
    (found,) = result
    return max(r.seconds for r in found.results) if isinstance(found, Outcome) else None


def _all_states(state: str):
    def check(result, n: int) -> str | None:
        states = [d["state"] for d in result["devices"]]
        return None if states == [state] * n else f"states {sorted(set(states))}, wanted {state}"

    return check


def _all_in_sync(result, n: int) -> str | None:
    (found,) = result
    return None if found.in_sync and len(found.devices) == n else f"drift: {found.drift[:3]}"


def _synced(state: str):
    def check(result, n: int) -> str | None:
        (outcome,) = result
        states = [r.state for r in outcome.results]
        return None if outcome.ok and states == [state] * n else f"{outcome.summary()[:200]}"

    return check
