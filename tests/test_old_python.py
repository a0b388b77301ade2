"""The device side on a real old Python: Debian 12's /usr/bin/python3 (3.11.2, as on Raspberry Pi
OS), whose tarfile has no `data_filter`, in a venv with only the device side installed
(`.[device-onnx]`, with onnxruntime 1.23, which still follows ONNX external data outside the model
directory).

`make old-python` builds that venv (`make test` and `make test-old-python` do it first). Without
it these tests fail, never skip: a device server that cannot take an upload on the Python that
devices ship is a broken release.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests

from arachne_mlflow.client import DeviceClient
from arachne_mlflow.errors import InvalidInputError
from tests.helpers.archives import tar_bytes, tar_member
from tests.helpers.model_dirs import external_data_model_dir
from tests.helpers.servers import ServerProcess
from tests.helpers.v2 import local_outputs, model_inputs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOW = (
    "build it with `make old-python` (a venv from /usr/bin/python3 holding `pip install -e '.[device-onnx]' "
    "'onnxruntime<1.24'`; on Debian it runs `apt-get install python3 python3-venv` when they are "
    "missing), or set ARACHNE_OLD_PYTHON_VENV to such a venv of a Python >= 3.10 without tarfile.data_filter "
    "(3.10.0-3.10.11 or 3.11.0-3.11.3)"
)
_PROBE = (
    "import json, sys, tarfile, onnxruntime, arachne_mlflow.server; "
    "print(json.dumps([list(sys.version_info[:3]), hasattr(tarfile, 'data_filter'), onnxruntime.__version__]))"
)


@pytest.fixture(scope="module")
def old_python():
    """The old venv's interpreter, checked: a Python >= 3.10 without data_filter, onnxruntime < 1.24."""
    venv = Path(os.environ.get("ARACHNE_OLD_PYTHON_VENV", ROOT / ".venv-old-python"))
    python = (venv if venv.is_absolute() else ROOT / venv) / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"no old-Python venv at {python.parent.parent}: {HOW}", pytrace=False)
    stamp = python.parent.parent / ".installed"  # what `make old-python` writes once it has installed
    if stamp.is_file() and stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        pytest.fail(
            f"{python.parent.parent} is older than pyproject.toml (dependencies may have changed): {HOW}", pytrace=False
        )
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode:
        pytest.fail(f"{python} cannot import the device side ({probe.stderr.strip()[-500:]}): {HOW}", pytrace=False)
    version, has_filter, ort_version = json.loads(probe.stdout)
    if has_filter or version < [3, 10] or [int(p) for p in ort_version.split(".")[:2]] >= [1, 24]:
        pytest.fail(
            f"{python} is Python {version} (data_filter: {has_filter}) with onnxruntime {ort_version}: {HOW}",
            pytrace=False,
        )
    return python, ".".join(map(str, version))


@pytest.fixture(scope="module")
def old_server(tmp_path_factory, old_python):
    process = ServerProcess(tmp_path_factory.mktemp("old-python") / "store", python=str(old_python[0])).start()
    yield process
    process.stop()


def test_push_and_infer_on_a_python_without_tarfile_data_filter(old_server, old_python, mlflow_models):
    model = mlflow_models["onnx_linear"]
    inputs = model_inputs(model, batch=1)
    with DeviceClient("127.0.0.1", old_server.port) as client:
        assert client.server_metadata()["python"] == old_python[1]
        assert client.upload_model("linear", model)
        np.testing.assert_allclose(client.infer("linear", inputs)["y"], local_outputs(model, inputs)["y"], rtol=1e-6)


def test_extraction_on_the_old_python_drops_special_bits_and_refuses_escapes(old_server, mlflow_models):
    """What tarfile's data filter would do, done by our own extraction on an interpreter that lacks it."""
    good = {name: (mlflow_models["onnx_linear"] / name).read_bytes() for name in ("MLmodel", "model.onnx")}
    mlmodel, model = tar_member("MLmodel", good["MLmodel"]), tar_member("model.onnx", good["model.onnx"])
    model[0].mode, model[0].uid, model[0].gid = 0o6777, 4242, 4242
    url = f"{old_server.url}/v2/repository/models/modes"
    assert requests.put(url, data=tar_bytes([mlmodel, model]), timeout=60).status_code == 200
    version_dir = json.loads((old_server.store / "modes" / "CURRENT.json").read_text())["version_dir"]
    installed = (old_server.store / "modes" / version_dir / "model.onnx").stat()
    assert stat.S_IMODE(installed.st_mode) == 0o755 and installed.st_uid == os.getuid()
    for hostile in (
        [tar_member("../escape", b"bad"), mlmodel],
        [tar_member("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), mlmodel],
        [mlmodel, model, tar_member("hard", kind=tarfile.LNKTYPE, linkname="model.onnx")],
    ):
        response = requests.put(url.replace("modes", "fresh"), data=tar_bytes(hostile), timeout=60)
        assert response.status_code == 400, response.text
    assert not (old_server.store / "fresh").exists() and not (old_server.store.parent / "escape").exists()


def test_onnx_external_data_outside_is_refused_where_onnxruntime_would_read_it(
    old_server, old_python, mlflow_models, tmp_path
):
    """This onnxruntime infers with the outside file's bytes as weights; the server refuses the model first."""
    secret = tmp_path / "secret.bin"
    model = external_data_model_dir(tmp_path / "model", mlflow_models["onnx_linear"], str(secret), secret)
    run = (
        "import json, numpy, onnxruntime; "
        f"session = onnxruntime.InferenceSession({str(model / 'model.onnx')!r}); "
        "print(json.dumps(session.run(None, {'x': numpy.ones((1, 4), numpy.float32)})[0].tolist()))"
    )
    follows = subprocess.run([old_python[0], "-c", run], capture_output=True, text=True, timeout=120)
    assert follows.returncode == 0, f"this onnxruntime refuses it by itself: {follows.stderr[-300:]}"
    ones = {"x": np.ones((1, 4), np.float32)}
    np.testing.assert_allclose(json.loads(follows.stdout), local_outputs(mlflow_models["onnx_linear"], ones)["y"])
    with DeviceClient("127.0.0.1", old_server.port) as client:
        with pytest.raises(InvalidInputError, match="outside the model's directory"):
            client.upload_model("outside", model)
        assert client.model_record("outside") is None
