"""Cross-compiling TVM through the flavor: a Relax module compiled here for aarch64, linked by Debian's
cross compiler (`make system-deps` installs gcc-aarch64-linux-gnu), kept from loading on this x86_64
machine, and refused by an x86_64 device before anything is uploaded."""

from __future__ import annotations

import json
import os
import platform
import shutil
import struct

import mlflow
import pytest
import tvm
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import IncompatibleModelError, InvalidInputError
from arachne_mlflow.flavors import tvm as arachne_tvm
from arachne_mlflow.model.directory import read_model_dir
from tests.helpers import models
from tests.helpers.servers import ServerProcess

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
EM_AARCH64, EM_X86_64 = 183, 62
TOKEN = "cross-token"


@pytest.fixture(scope="module")
def relax_linear():
    return models.relax_module(models.onnx_linear(1))


def _elf_machine(library) -> int:
    """e_machine of an ELF file (the CPU it is for), read from its header."""
    head = library.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", "not an ELF file"
    return struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]


def test_host_machine_is_x86_64():
    """The other tests cross-compile for aarch64 and push to this machine's server as an x86_64 device."""
    assert platform.machine() == "x86_64"


@pytest.mark.parametrize(
    "target", [AARCH64, json.dumps(AARCH64), tvm.target.Target(AARCH64)], ids=["dict", "json", "Target"]
)
def test_cross_compiled_library_is_an_aarch64_elf(relax_linear, tmp_path, target):
    mod, weights = relax_linear
    arachne_tvm.save_model(mod, tmp_path / "model", params=weights, target=target, arch="aarch64")
    model = read_model_dir(tmp_path / "model")
    assert _elf_machine(tmp_path / "model" / model.model_file) == EM_AARCH64
    assert model.tvm["arch"] == "aarch64"
    assert json.loads(model.tvm["target"])["mtriple"] == "aarch64-linux-gnu"
    assert model.model_spec["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 4]}]
    # not loaded here to check it (it cannot run on x86_64), and loading it says why
    with pytest.raises(IncompatibleModelError, match="compiled by TVM for aarch64"):
        arachne_tvm.load_model(str(tmp_path / "model"))


def test_arch_defaults_to_the_target_cpu(relax_linear, tmp_path):
    mod, weights = relax_linear
    arachne_tvm.save_model(mod, tmp_path / "cross", params=weights, target=AARCH64)
    assert read_model_dir(tmp_path / "cross").tvm["arch"] == "aarch64"
    arachne_tvm.save_model(mod, tmp_path / "host", params=weights, target={"kind": "llvm"})
    host = read_model_dir(tmp_path / "host")
    assert host.tvm["arch"] == "x86_64" and _elf_machine(tmp_path / "host" / host.model_file) == EM_X86_64


def test_explicit_cc_links_the_library(relax_linear, tmp_path):
    mod, weights = relax_linear
    arachne_tvm.save_model(mod, tmp_path / "model", params=weights, target=AARCH64, cc="aarch64-linux-gnu-gcc")
    assert _elf_machine(tmp_path / "model" / "model.so") == EM_AARCH64


def test_linker_failure_says_what_to_pass(relax_linear, tmp_path):
    mod, weights = relax_linear
    with pytest.raises(InvalidInputError, match=r"with g\+\+ failed \(.*file in wrong format\): pass a cc="):
        arachne_tvm.save_model(mod, tmp_path / "host-cc", params=weights, target=AARCH64, cc="g++")
    with pytest.raises(InvalidInputError, match="with no-such-cc failed"):
        arachne_tvm.save_model(mod, tmp_path / "missing-cc", params=weights, target=AARCH64, cc="no-such-cc")
    assert not (tmp_path / "host-cc").exists() and not (tmp_path / "missing-cc").exists()


def test_without_a_cross_compiler_the_error_says_what_to_install(relax_linear, tmp_path, monkeypatch):
    """On a PATH with the host's compiler and linker only, TVM links with g++, which fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("g++", "ld"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    mod, weights = relax_linear
    with pytest.raises(
        InvalidInputError,
        match=r"for aarch64-linux-gnu with .*g\+\+ failed \(.*file in wrong format\): install a cross compiler for "
        r"aarch64-linux-gnu \(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu, .*\) or pass cc=",
    ):
        arachne_tvm.save_model(mod, tmp_path / "model", params=weights, target=AARCH64)
    assert not (tmp_path / "model").exists()


def test_bad_targets_and_cc_with_a_library(relax_linear, tvm_linear, tmp_path):
    mod, weights = relax_linear
    with pytest.raises(InvalidInputError, match="bad TVM target"):
        arachne_tvm.save_model(mod, tmp_path / "bad", params=weights, target={"kind": "no-such-kind"})
    with pytest.raises(InvalidInputError, match="cc= links a library compiled here"):
        arachne_tvm.save_model(
            str(tvm_linear["model_file"]), tmp_path / "lib", env_file=tvm_linear["env_file"], cc="gcc"
        )


@pytest.mark.slow
def test_push_to_an_x86_device_is_refused_before_upload(relax_linear, mlflow_store, tmp_path, monkeypatch):
    mod, weights = relax_linear
    info = arachne_tvm.log_model(mod, name="model", params=weights, target=AARCH64, registered_model_name="cross")
    # the weights went into the model's params.bin, not into MLflow's own `params` of the logged model
    assert mlflow.get_logged_model(info.model_id).params == {}
    assert read_model_dir(mlflow.artifacts.download_artifacts(info.model_uri)).tvm["params_file"] == "params.bin"
    server = ServerProcess(tmp_path / "store", token=TOKEN).start()
    try:
        monkeypatch.setenv("ARACHNE_TOKEN", TOKEN)
        client = get_deploy_client(f"arachne-jetson://127.0.0.1:{server.port}")
        with pytest.raises(MlflowException, match="is x86_64 but the TVM model was compiled for aarch64"):
            client.create_deployment("cross", info.model_uri)
        with DeviceClient("127.0.0.1", server.port, token=TOKEN) as device:
            # refused by the plugin's check of GET /v2: the server answered no upload (it would count a 400;
            # the 404s are the plugin asking whether the device holds the deployment already)
            errors = [line for line in device.metrics().splitlines() if line.startswith("arachne_http_errors_total{")]
            assert all('status="404"' in line for line in errors), errors
            assert device.repository_index() == []
    finally:
        server.stop()
