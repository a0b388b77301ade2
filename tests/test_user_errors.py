"""A user's mistakes get messages in the user's words: the CLI's one line, a wrong input name named,
an input file of the wrong shape, legacy pins, MLflow's progress bars off a terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from arachne_mlflow import cli
from arachne_mlflow import runtime as arachne_runtime
from arachne_mlflow.deployments import source
from arachne_mlflow.deployments.inputs import to_arrays
from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.flavors import onnx as arachne_onnx
from arachne_mlflow.flavors.legacy import save_legacy_model
from arachne_mlflow.runtime import RuntimeModule, register_runtime

ROOT = Path(__file__).resolve().parents[1]
ONE_INPUT = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
TWO_INPUTS = [*ONE_INPUT, {"name": "z", "datatype": "FP32", "shape": [-1, 4]}]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`arachne-mlflow ARGS` in a child process, as a user runs it."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "arachne_mlflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("arachne-mlflow: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_user_errors_are_one_line_without_a_traceback(tmp_path, onnx_linear_file):
    missing = _one_error_line(_cli("benchmark", "onnx", str(tmp_path / "missing.onnx")))
    assert "model file not found" in missing and "missing.onnx" in missing
    bad_json = _one_error_line(_cli("benchmark", "onnx", str(onnx_linear_file), "--options", "{num_threads: 2}"))
    assert "--options must be a JSON object" in bad_json
    unknown = _one_error_line(_cli("benchmark", "nosuch", str(onnx_linear_file)))
    assert "unknown runtime 'nosuch'" in unknown


def test_cli_reports_mlflow_errors_on_one_line(tmp_path, onnx_linear_file):
    line = _one_error_line(
        _cli(
            "import-legacy", "--model-file", str(onnx_linear_file), "--name", "m", env={"MLFLOW_TRACKING_URI": "x://y"}
        )
    )
    assert "tracking" in line.lower() or "URI" in line  # MLflow's own words, on one line


def test_import_legacy_names_the_cli_flags_not_python_arguments(tmp_path, tvm_linear):
    line = _one_error_line(
        _cli("import-legacy", "--model-file", str(tvm_linear["model_file"]), "--output", str(tmp_path / "out"))
    )
    assert "pass --env-file" in line and "env_file=" not in line and "signature=" not in line
    (tmp_path / "model.bin").write_bytes(b"0")
    line = _one_error_line(
        _cli("import-legacy", "--model-file", str(tmp_path / "model.bin"), "--output", str(tmp_path / "out"))
    )
    assert "pass --runtime" in line and "runtime=" not in line
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback(onnx_linear_file):
    """Only a user's errors become one line: an exception nobody meant to raise propagates."""

    @register_runtime("test-buggy")
    class Buggy(RuntimeModule):
        def __init__(self, model_file=None, **options):
            raise ZeroDivisionError("a bug")

        def _infer(self, inputs):
            return []

    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["benchmark", "test-buggy", str(onnx_linear_file)])


def test_infer_by_name_names_a_wrong_input(onnx_linear_file):
    x = np.zeros((1, 4), np.float32)
    with arachne_runtime.init("onnx", model_file=str(onnx_linear_file)) as m:
        np.testing.assert_array_equal(m.infer({"x": x})[0], m.infer([x])[0])
        with pytest.raises(
            InvalidInputError, match=r"the model's inputs are \['x'\]: no input 'wrong'; missing \['x'\]"
        ):
            m.infer({"wrong": x})
        with pytest.raises(InvalidInputError, match=r"no input 'wrong': valid inputs are .*\['x'\]"):
            m.set_input("wrong", x)


def _read(tmp_path, text: str) -> pd.DataFrame:
    """The input file as `mlflow deployments predict --input-path` reads it."""
    path = tmp_path / "in.json"
    path.write_text(text)
    return pd.read_json(path)


@pytest.mark.parametrize(
    ("text", "specs", "says"),
    [
        ('{"inputs": {"wrong": [[1, 2, 3, 4]]}}', ONE_INPUT, r"the model has no input 'wrong': its inputs are \['x'\]"),
        ('{"wrong": [[1, 2, 3, 4]]}', ONE_INPUT, r"the input file names \['wrong'\].*its inputs are \['x'\]"),
        ("[[1, 2, 3]]", ONE_INPUT, r"input 'x' takes rows of shape \[4\], but the file's rows have 3 values"),
        ('{"inputs": [[1, 2, 3, 4]]}', TWO_INPUTS, r'several inputs \[\'x\', \'z\'\]: give .*"x": \[...\], "z"'),
        ('{"inputs": {"x": [[1, 2, 3, 4]], "y": [[1]]}}', TWO_INPUTS, r"no input 'y': its inputs are \['x', 'z'\]"),
    ],
)
def test_a_predict_input_file_of_the_wrong_shape_says_what_is_expected(tmp_path, text, specs, says):
    with pytest.raises(MlflowException, match=says) as caught:
        to_arrays(_read(tmp_path, text), specs)
    assert "an input file like" in caught.value.message or "takes rows" in caught.value.message


def test_predict_input_files_of_the_right_shape_still_work(tmp_path):
    rows = to_arrays(_read(tmp_path, '{"inputs": [[1, 2, 3, 4]]}'), ONE_INPUT)
    named = to_arrays(_read(tmp_path, '{"inputs": {"x": [[1, 2, 3, 4]], "z": [[5, 6, 7, 8]]}}'), TWO_INPUTS)
    plain = to_arrays(_read(tmp_path, "[[1, 2, 3, 4]]"), ONE_INPUT)
    assert rows["x"].dtype == np.float32 and rows["x"].shape == (1, 4)
    assert sorted(named) == ["x", "z"] and named["z"].tolist() == [[5, 6, 7, 8]]
    assert plain["x"].shape == (1, 4)


def test_legacy_pins_that_contradict_ours_are_dropped_with_a_log_line(tmp_path, onnx_linear_file, caplog):
    env = {
        "model_spec": {
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
        },
        "dependencies": [{"pip": [{"numpy": "1.21.0"}, {"pyyaml": "6.0.1"}, {"pillow": "9.0.0"}]}],
    }
    (tmp_path / "env.yaml").write_text(yaml.safe_dump(env))
    with caplog.at_level(logging.WARNING, logger="arachne_mlflow.flavors.legacy"):
        save_legacy_model(tmp_path / "model", model_file=str(onnx_linear_file), env_file=str(tmp_path / "env.yaml"))
    requirements = (tmp_path / "model" / "requirements.txt").read_text().split()
    assert "numpy==1.21.0" not in requirements
    assert {"pillow==9.0.0", "pyyaml==6.0.1"} <= set(requirements)  # no clash: kept
    assert (
        "dropped numpy==1.21.0 from the old env.yaml's dependencies: arachne-mlflow requires numpy>=1.24" in caplog.text
    )


def test_downloads_draw_no_progress_bar_off_a_terminal(mlflow_store, onnx_linear_file, tmp_path, capfd, monkeypatch):
    """MLflow draws its bar on stderr unless told not to; a create/update/sync writing to a log must not."""
    monkeypatch.delenv(source.PROGRESS_BAR_VARIABLE, raising=False)
    import mlflow

    info = arachne_onnx.log_model(str(onnx_linear_file), name="bar", registered_model_name="bar-test")
    capfd.readouterr()
    mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "plain"))
    assert "Downloading artifacts" in capfd.readouterr().err  # (what MLflow does by itself here)
    resolved = source.resolve(f"models:/bar-test/{info.registered_model_version}", str(tmp_path / "ours"))
    assert resolved.model.runtime == "onnx"
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert source.PROGRESS_BAR_VARIABLE not in os.environ  # nothing left behind in the caller's process
    monkeypatch.setenv(source.PROGRESS_BAR_VARIABLE, "true")  # the caller's own choice is kept
    source.resolve(f"models:/bar-test/{info.registered_model_version}", str(tmp_path / "again"))
    assert "Downloading artifacts" in capfd.readouterr().err
    assert os.environ[source.PROGRESS_BAR_VARIABLE] == "true"


def _mlflow_deployments(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`mlflow deployments ARGS` in a child process (MLflow's own CLI, our plugin inside it)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HOME": str(tmp_path),  # (no fleet file there)
    }
    environment.pop("ARACHNE_FLEET", None)
    mlflow = Path(sys.executable).with_name("mlflow")
    return subprocess.run(
        [str(mlflow), "deployments", *args], capture_output=True, text=True, timeout=300, env=environment
    )


@pytest.mark.slow
def test_mlflow_deployments_user_errors_are_one_line_without_a_traceback(tmp_path, onnx_linear_file):
    from tests.helpers.servers import free_port

    model = tmp_path / "model"
    arachne_onnx.save_model(str(onnx_linear_file), model)
    closed = f"arachne-jetson://127.0.0.1:{free_port()}"
    cases = {
        "Model Version (name=nope, version=3) not found": (
            "create",
            "-t",
            closed,
            "--name",
            "x",
            "-m",
            "models:/nope/3",
        ),
        "no such file or directory": ("create", "-t", closed, "--name", "x", "-m", str(tmp_path / "missing")),
        "no fleet file": ("get", "-t", "arachne-jetson://@lyon", "--name", "x"),
        "unreachable": ("create", "-t", closed, "--name", "x", "-m", str(model)),
    }
    for words, args in cases.items():
        result = _mlflow_deployments(tmp_path, *args)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and words in errors[0], result.stderr


def test_the_plugin_still_raises_mlflow_exceptions_for_python_callers(tmp_path):
    from mlflow.deployments import get_deploy_client

    client = get_deploy_client("arachne-jetson://127.0.0.1:1")
    with pytest.raises(MlflowException, match="no such file or directory"):
        client.create_deployment("x", str(tmp_path / "missing"))
