"""Server processes for the benchmarks: our device server and `mlflow models serve`, on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120.0) -> float:
    """Poll `url` until it answers 200; returns the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - start
        except requests.ConnectionError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextmanager
def device_server(store: Path, extra: tuple[str, ...] = ()) -> Iterator[tuple[int, subprocess.Popen, float]]:
    """`python -m arachne_mlflow.server` on a free port; yields (port, process, seconds to ready)."""
    port, process = _start_device(store, extra)
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", process)
        yield port, process, ready
    finally:
        stop_process(process)


@contextmanager
def device_servers(
    stores: list[Path], extra: tuple[str, ...] = (), batch: int = 16, python: str | None = None
) -> Iterator[list[int]]:
    """Many device servers at once (`batch` starting at a time, so that a small machine keeps up),
    run by `python` (another environment's interpreter; default this one); yields their ports.
    Every one is stopped at the end, whatever happened."""
    processes: list[subprocess.Popen] = []
    ports: list[int] = []
    try:
        for first in range(0, len(stores), batch):
            chunk = stores[first : first + batch]
            started = [_start_device(store, extra, python) for store in chunk]
            processes += [process for _, process in started]
            for store, (port, process) in zip(chunk, started):
                for attempt in range(3):  # another process may take a free port before the server binds it
                    try:
                        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", process, timeout=300)
                        break
                    except RuntimeError:
                        if process.poll() is None or attempt == 2:
                            raise
                        port, process = _start_device(store, extra, python)
                        processes.append(process)
                ports.append(port)
        yield ports
    finally:
        for process in processes:  # all asked to stop first, then waited for: shut-downs overlap
            if process.poll() is None:
                process.terminate()
        for process in processes:
            stop_process(process)


def _start_device(store: Path, extra: tuple[str, ...], python: str | None = None) -> tuple[int, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen(
        [
            python or sys.executable,
            "-m",
            "arachne_mlflow.server",
            "--port",
            str(port),
            "--model-store",
            str(store),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return port, process


@contextmanager
def mlflow_scoring_server(model_dir: Path) -> Iterator[int]:
    """`mlflow models serve --env-manager local` for `model_dir`; yields its port."""
    with mlflow_scoring_process(model_dir) as (port, _):
        yield port


@contextmanager
def mlflow_scoring_process(model_dir: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """`mlflow models serve --env-manager local` for `model_dir`; yields its port and process."""
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            str(model_dir),
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", process, timeout=180)
        yield port, process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a server process (killed if it does not end within 20 s) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
