"""Session fixtures: each small model is built once and written under one temporary directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import models
from tests.helpers.archives import model_tar
from tests.helpers.mlflow_server import QUIET_ENV, MlflowServer
from tests.helpers.model_dirs import runtime_details, write_model_dir

for _name, _value in QUIET_ENV.items():  # before anything imports mlflow (its telemetry checks at import)
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def onnx_linear_file(model_dir):
    path = model_dir / "linear.onnx"
    path.write_bytes(models.onnx_linear(1).SerializeToString())
    return path


@pytest.fixture(scope="session")
def onnx_dynamic_file(model_dir):
    path = model_dir / "dynamic.onnx"
    path.write_bytes(models.onnx_linear("N").SerializeToString())
    return path


@pytest.fixture(scope="session")
def onnx_two_io_file(model_dir):
    path = model_dir / "two_io.onnx"
    path.write_bytes(models.onnx_two_in_two_out().SerializeToString())
    return path


@pytest.fixture(scope="session")
def tflite_cnn_file(model_dir):
    path = model_dir / "cnn.tflite"
    path.write_bytes(models.tflite_cnn())
    return path


@pytest.fixture(scope="session")
def tflite_two_inputs_file(model_dir):
    path = model_dir / "two_inputs.tflite"
    path.write_bytes(models.tflite_two_inputs())
    return path


@pytest.fixture(scope="session")
def tvm_linear(model_dir):
    """The linear ONNX model compiled by TVM, weights detached, with its model_spec and env.yaml."""
    onnx_model = models.onnx_linear(1)
    built = models.tvm_from_onnx(onnx_model, model_dir / "tvm_linear")
    built["model_spec"] = models.onnx_spec(onnx_model)
    env_file = model_dir / "tvm_linear" / "env.yaml"
    env_file.write_text(yaml.safe_dump({"model_spec": built["model_spec"], "tvm_device": "cpu"}))
    built["env_file"] = env_file
    return built


@pytest.fixture(scope="session")
def tvm_two_io(model_dir):
    """The two-input, two-output ONNX model compiled by TVM with weights bound as constants."""
    onnx_model = models.onnx_two_in_two_out()
    built = models.tvm_from_onnx(onnx_model, model_dir / "tvm_two_io", detach_params=False, fmt="tar")
    built["model_spec"] = models.onnx_spec(onnx_model)
    return built


@pytest.fixture(scope="session")
def typed_models(tmp_path_factory):
    """MLflow model dirs of models with string and bfloat16 tensors, by short name."""
    root = tmp_path_factory.mktemp("typed-models")
    files = {
        "onnx_strings.onnx": models.onnx_strings().SerializeToString(),
        "onnx_bad_text.onnx": models.onnx_string_constant(b"caf\xe9").SerializeToString(),  # Latin-1, not UTF-8
        "onnx_bfloat16.onnx": models.onnx_bfloat16().SerializeToString(),
        "tflite_strings.tflite": models.tflite_strings(),
    }
    dirs = {}
    for file_name, content in files.items():
        path = root / file_name
        path.write_bytes(content)
        name, runtime = path.stem, file_name.split("_")[0]
        dirs[name] = write_model_dir(root / name, runtime, path, runtime_details(runtime, path))
    return dirs


@pytest.fixture(scope="session")
def linear_versions(tmp_path_factory):
    """Three versions of one ONNX model (x[1, 4] -> y[1, 3]), an input, and each version's output for it
    (all different): `(x, [{"dir", "y"}, ...])`."""
    from tests.helpers.model_dirs import scaled_linear
    from tests.helpers.v2 import local_outputs

    root = tmp_path_factory.mktemp("linear-versions")
    x = {"x": np.array([[0.5, 1.0, 1.5, 2.0]], np.float32)}
    versions = []
    for scale in (1.0, -3.0, 0.5):
        directory = scaled_linear(root, scale)
        versions.append({"dir": directory, "y": local_outputs(directory, x)["y"]})
    assert not np.array_equal(versions[0]["y"], versions[1]["y"]) and not np.array_equal(
        versions[1]["y"], versions[2]["y"]
    )
    return x, versions


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A real MLflow tracking store and registry (sqlite) in a temporary directory, for the session.

    Its experiment keeps artifacts there too (MLflow's default would be ./mlruns in the cwd).
    Yields the tracking URI; the previous URI and experiment come back afterwards.
    """
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    previous_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("arachne-tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    yield uri
    mlflow.set_tracking_uri(previous)
    mlflow.tracking.fluent._active_experiment_id = None
    if previous_experiment is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = previous_experiment


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (sqlite backend, --serve-artifacts) on loopback, for the session.

    Yields its URL. Tests that talk to it set the tracking URI themselves (`tracking_server`
    does it for one test) so that tests using `mlflow_store` are not affected. Tests that stop or restart a
    tracking server start their own `MlflowServer`.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.url
    server.stop()


@pytest.fixture
def tracking_server(mlflow_server):
    """The session's `mlflow server` as the tracking and registry URI during one test (restored after)."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(previous)
    if previous_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous_env


@dataclass
class FlavorCase:
    """One model per flavor: how to log it, and how to load the same file with the runtime directly."""

    name: str
    flavor: Any
    model: Any
    kwargs: dict
    init_kwargs: dict
    example: np.ndarray

    def direct(self):
        from arachne_mlflow import runtime as arachne_runtime

        return arachne_runtime.init(self.name, **self.init_kwargs)


@pytest.fixture(params=["tflite", "onnx", "tvm"])
def flavor_case(request) -> FlavorCase:
    from arachne_mlflow.flavors import onnx, tflite, tvm

    rng = np.random.default_rng(1)
    if request.param == "tflite":
        path = request.getfixturevalue("tflite_cnn_file")
        return FlavorCase(
            "tflite",
            tflite,
            str(path),
            {},
            {"model_file": str(path)},
            rng.standard_normal((2, 8, 8, 3)).astype(np.float32),
        )
    if request.param == "onnx":
        path = request.getfixturevalue("onnx_dynamic_file")
        return FlavorCase(
            "onnx", onnx, str(path), {}, {"model_file": str(path)}, rng.standard_normal((3, 4)).astype(np.float32)
        )
    built = request.getfixturevalue("tvm_linear")
    files = {"params_file": str(built["params_file"]), "env_file": str(built["env_file"])}
    return FlavorCase(
        "tvm",
        tvm,
        str(built["model_file"]),
        files,
        {"model_file": str(built["model_file"]), **files},
        rng.standard_normal((1, 4)).astype(np.float32),
    )


@pytest.fixture(scope="session")
def onnx_linear_model(tmp_path_factory, onnx_linear_file):
    """The linear ONNX model as a hand-written MLflow model dir (no TensorFlow needed to build it)."""
    root = tmp_path_factory.mktemp("onnx-linear-model")
    return write_model_dir(root / "onnx_linear", "onnx", onnx_linear_file, runtime_details("onnx", onnx_linear_file))


@pytest.fixture(scope="session")
def mlflow_models(
    tmp_path_factory,
    onnx_linear_file,
    onnx_two_io_file,
    tflite_cnn_file,
    tflite_two_inputs_file,
    tvm_linear,
    tvm_two_io,
):
    """Hand-written MLflow model dirs of every test model, by short name (all three runtimes)."""
    root = tmp_path_factory.mktemp("mlflow-models")
    return {
        "onnx_linear": write_model_dir(
            root / "onnx_linear", "onnx", onnx_linear_file, runtime_details("onnx", onnx_linear_file)
        ),
        "onnx_two_io": write_model_dir(
            root / "onnx_two_io", "onnx", onnx_two_io_file, runtime_details("onnx", onnx_two_io_file)
        ),
        "tflite_cnn": write_model_dir(
            root / "tflite_cnn",
            "tflite",
            tflite_cnn_file,
            runtime_details("tflite", tflite_cnn_file),
            runtime_options={"num_threads": 1},
        ),
        "tflite_two_inputs": write_model_dir(
            root / "tflite_two_inputs",
            "tflite",
            tflite_two_inputs_file,
            runtime_details("tflite", tflite_two_inputs_file),
        ),
        "tvm_linear": write_model_dir(
            root / "tvm_linear",
            "tvm",
            tvm_linear["model_file"],
            tvm_linear["model_spec"],
            params_file=tvm_linear["params_file"],
        ),
        "tvm_two_io": write_model_dir(root / "tvm_two_io", "tvm", tvm_two_io["model_file"], tvm_two_io["model_spec"]),
    }


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, onnx_linear_model):
    """The device server's app in this process, through Starlette's TestClient (ASGI calls, no socket,
    lifespan run), holding `onnx_linear`: for route logic that needs no server process."""
    from starlette.testclient import TestClient

    from arachne_mlflow.server.app import create_app

    app = create_app(str(tmp_path_factory.mktemp("in-process") / "store"), max_request_bytes=1024**2)
    with TestClient(app) as client:
        response = client.put("/v2/repository/models/onnx_linear", content=model_tar(onnx_linear_model))
        assert response.status_code == 200, response.text
        yield client
