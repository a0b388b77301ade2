"""The servers a user would pick instead of ours, each installed into a venv of its own under
benchmarks/.cache/peers (never the project's venv or CI's): MLServer 1.7 with its MLflow runtime,
and a KServe 0.21 ModelServer. Their dependencies conflict, hence two venvs.

Every peer runs the same ONNX file with onnxruntime 1.32's defaults (CPU execution provider,
default SessionOptions: as many intra-op threads as cores, spin-waiting on, all graph
optimizations), which is what the device server uses; each is started with its access log off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.models import CACHE
from benchmarks.servers import free_port, stop_process, wait_ready

PEERS = CACHE / "peers"
REQUIREMENTS = {
    "mlserver": ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "onnxruntime==1.32.0", "onnx"],
    "kserve": ["kserve==0.21.0", "onnxruntime==1.32.0"],
}


def ensure_envs() -> dict[str, Path]:
    """Create each peer's venv and install it on first use; returns the Python of each."""
    pythons = {}
    for name, requirements in REQUIREMENTS.items():
        venv = PEERS / name
        marker = venv / ".installed"
        wanted = "\n".join(requirements)
        if not marker.is_file() or marker.read_text() != wanted:
            print(f"installing {name} into {venv} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *requirements], check=True)
            marker.write_text(wanted)
        pythons[name] = venv / "bin" / "python"
    return pythons


@contextmanager
def mlserver(python: Path, models: dict[str, Path], workdir: Path) -> Iterator[tuple[int, int]]:
    """`mlserver start` serving MLflow model dirs through mlserver-mlflow; yields (port, pid).

    Inference runs in the server process (`parallel_workers: 0`): one model on two cores gains
    nothing from a worker process and pays a hand-off per request.
    """
    port = free_port()
    root = workdir / "mlserver"
    for name, model_dir in models.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        settings = {
            "name": name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": str(model_dir)},
        }
        (root / name / "model-settings.json").write_text(json.dumps(settings))
    server = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "debug": False,
        "parallel_workers": 0,
        "gzip_enabled": False,
    }
    (root / "settings.json").write_text(json.dumps(server))
    with _process(
        [str(python.parent / "mlserver"), "start", str(root)], f"http://127.0.0.1:{port}/v2/health/ready"
    ) as pid:
        yield port, pid


@contextmanager
def kserve(python: Path, models: dict[str, Path]) -> Iterator[tuple[int, int]]:
    """A KServe ModelServer over ONNX files by name (benchmarks/kserve_onnx.py); yields (port, pid)."""
    port = free_port()
    args = [str(python), str(Path(__file__).parent / "kserve_onnx.py"), str(port)]
    args += [f"{name}={path}" for name, path in models.items()]
    with _process(args, f"http://127.0.0.1:{port}/v2/health/ready") as pid:
        yield port, pid


@contextmanager
def _process(args: list[str], ready_url: str) -> Iterator[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = str(Path(args[0]).parent) + os.pathsep + env.get("PATH", "")
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("PEER_LOG", os.devnull), "ab"), env=env
    )
    try:
        wait_ready(ready_url, process, timeout=180)
        yield process.pid
    finally:
        stop_process(process)
