"""What a device installs and runs: the device extras in fresh virtual environments (pip, from a copy of
this checkout, through pip's cache), and which onnxruntime build a server reports in `GET /v2`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.client import DeviceClient
from arachne_mlflow.runtime import onnx_build
from tests.helpers.servers import ServerProcess

REPO = Path(__file__).resolve().parents[1]
HOST_ONLY = {"onnx", "watchfiles", "websockets", "mlflow", "pandas", "tensorflow", "tensorflow-cpu", "requests"}
PIP_TIMEOUT = 900


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _onnx_entry(device: DeviceClient) -> dict:
    return {r["name"]: r for r in device.server_metadata()["runtimes"]}["onnx"]


def _load(model_dir: Path):
    from arachne_mlflow.model.directory import read_model_dir

    return arachne_runtime.load(read_model_dir(model_dir))


# -- the build GET /v2 reports ------------------------------------------------------------------
@pytest.mark.slow
def test_onnxruntime_build_reported_without_loading_it_into_the_server(tmp_path, mlflow_models):
    server = ServerProcess(tmp_path / "store").start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            entry = _onnx_entry(device)
            assert entry == {
                "name": "onnx",
                "library": "onnxruntime",
                "version": onnxruntime.__version__,
                "providers": onnxruntime.get_available_providers(),
            }
            # asked in a child: the server itself has not mapped onnxruntime's library
            assert "onnxruntime_pybind11_state" not in _mapped_libraries(server.process.pid)
            device.upload_model("linear", mlflow_models["onnx_linear"])
            assert "onnxruntime_pybind11_state" in _mapped_libraries(server.process.pid)
            assert _onnx_entry(device) == entry
    finally:
        server.stop()


def test_conflicting_onnxruntime_distributions_are_reported(tmp_path, monkeypatch):
    """NVIDIA's onnxruntime-gpu installed beside PyPI's onnxruntime: both own the `onnxruntime` module."""
    dist_info = tmp_path / "onnxruntime_gpu-1.19.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.19.0\n")
    (dist_info / "top_level.txt").write_text("onnxruntime\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    build = onnx_build.onnxruntime_build.__wrapped__()
    assert build["library"] == "onnxruntime" and build["version"] == onnxruntime.__version__
    assert build["conflict"].startswith("onnxruntime and onnxruntime-gpu all install the onnxruntime module")
    assert "pip uninstall every one of them" in build["conflict"]


# -- device installs in fresh virtual environments ----------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the package's sources: pip builds in the source tree, which must stay clean."""
    root = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "arachne_mlflow", root / "arachne_mlflow", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _clean_env() -> dict:
    """This environment without what would let the venv's Python import this checkout or this venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _venv(directory: Path, *requirements: str) -> Path:
    """A fresh virtual environment (no system site-packages) with `requirements` pip-installed; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True, env=_clean_env())
    python = directory / "bin" / "python"
    _pip(python, *requirements)
    return python


def _pip(python: Path, *requirements: str) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _installed(python: Path) -> set[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout
    return {line.split("==")[0].lower().replace("_", "-") for line in out.split()}


def _serve_and_check(python: Path, store: Path, model_dirs: dict) -> dict:
    """Start the venv's server, upload each model, compare its outputs with a local run; GET /v2's onnx entry."""
    server = ServerProcess(store, command=("arachne_mlflow.cli", "serve"), python=str(python), env=_clean_env())
    server.start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            for name, model_dir in model_dirs.items():
                device.upload_model(name, model_dir)
                with _load(model_dir) as local:
                    rng = np.random.default_rng(5)
                    inputs = {
                        d["name"]: rng.standard_normal([max(n, 1) for n in d["shape"]]).astype(d["dtype"])
                        for d in local.get_input_details()
                    }
                    expected = local.infer(list(inputs.values()))
                got = device.infer(name, inputs)
                for value, want in zip(got.values(), expected):
                    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
            return _onnx_entry(device)
    finally:
        server.stop()


@pytest.mark.slow
def test_device_extras_install_no_host_packages_and_serve(source, tmp_path, mlflow_models):
    """`[server]` pins no onnxruntime (a Jetson brings its own build); the device extras add only runtimes."""
    python = _venv(tmp_path / "venv", f"{source}[server]")
    installed = _installed(python)
    assert {"arachne-mlflow", "uvicorn", "httptools", "uvloop", "starlette"} <= installed
    assert "onnxruntime" not in installed and not installed & HOST_ONLY, sorted(installed)
    _pip(python, f"{source}[device-onnx,device-tflite]")
    installed = _installed(python)
    assert not installed & HOST_ONLY, f"host-only packages on a device: {sorted(installed & HOST_ONLY)}"
    assert {"onnxruntime", "ai-edge-litert"} <= installed
    entry = _serve_and_check(
        python,
        tmp_path / "store",
        {"linear": mlflow_models["onnx_linear"], "cnn": mlflow_models["tflite_cnn"]},
    )
    assert entry["library"] == "onnxruntime" and "CPUExecutionProvider" in entry["providers"]
    assert "conflict" not in entry
    # a build whose native library cannot load (as when a GPU build misses a CUDA library) is reported, not fatal
    site_packages = Path(
        subprocess.check_output(
            [str(python), "-c", "import numpy, os; print(os.path.dirname(numpy.__path__[0]))"],
            text=True,
            env=_clean_env(),
        ).strip()
    )
    for library in (site_packages / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*"):
        library.unlink()
    server = ServerProcess(
        tmp_path / "store", command=("arachne_mlflow.cli", "serve"), python=str(python), env=_clean_env()
    )
    server.start()
    try:
        with DeviceClient("127.0.0.1", server.port) as device:
            broken = _onnx_entry(device)
    finally:
        server.stop()
    assert broken["library"] == "onnxruntime" and broken["providers"] is None
    assert broken["error"].startswith("onnxruntime cannot be imported: ") and "Error" in broken["error"]


# -- the systemd unit in SECURITY.md -------------------------------------------------------------
def _security_md_unit() -> str:
    text = (REPO / "SECURITY.md").read_text()
    block = text[text.index("```ini", text.index("A hardened systemd unit")) :]
    lines = block[len("```ini\n") : block.index("```", 6)].splitlines()
    return "\n".join(line[3:] if line.startswith("   ") else line for line in lines) + "\n"


def test_systemd_unit_in_security_md_is_valid(tmp_path):
    """systemd-analyze accepts every line (a comment after a setting would make systemd ignore it)."""
    unit = _security_md_unit()
    for setting in ("Restart=on-failure", "RestartSec=", "StartLimitBurst=", "MemoryMax=", "--log-level warning"):
        assert setting in unit
    script = Path(sys.executable).with_name("arachne-mlflow")
    assert script.is_file()
    (tmp_path / "arachne-server.service").write_text(unit.replace("/opt/arachne/venv/bin/arachne-mlflow", str(script)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "arachne-server.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "arachne-server.service" not in result.stderr, result.stderr
