"""MLflow-format model directories written by hand (no MLflow).

The MLmodel written here is what `arachne_mlflow.model.directory` reads: an `arachne` flavor block
and a tensor-based signature.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


def _signature(specs):
    return json.dumps(
        [
            {"name": s["name"], "type": "tensor", "tensor-spec": {"dtype": s["dtype"], "shape": list(s["shape"])}}
            for s in specs
        ]
    )


def write_model_dir(directory, runtime, model_file, spec, params_file=None, runtime_options=None):
    """Copy `model_file` (and `params_file`) into `directory` and write its MLmodel; return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_name = f"model{Path(model_file).suffix}"
    shutil.copy(model_file, directory / model_name)
    arachne = {"runtime": runtime, "model_file": model_name, "runtime_options": runtime_options or {}}
    if runtime == "tvm":
        arachne["tvm"] = {"device": "cpu"}
        if params_file:
            shutil.copy(params_file, directory / "params.bin")
            arachne["tvm"]["params_file"] = "params.bin"
    mlmodel = {
        "flavors": {"arachne": arachne, "python_function": {"loader_module": "arachne_mlflow.pyfunc"}},
        "signature": {"inputs": _signature(spec["inputs"]), "outputs": _signature(spec["outputs"])},
    }
    (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    (directory / "requirements.txt").write_text("arachne-mlflow\n")
    return directory


def runtime_details(runtime, model_file):
    from arachne_mlflow import runtime as arachne_runtime

    with arachne_runtime.init(runtime, model_file=str(model_file)) as module:
        return {"inputs": module.get_input_details(), "outputs": module.get_output_details()}


def external_data_model_dir(directory, linear_dir, location, weights):
    """The `onnx_linear` model dir `linear_dir` copied to `directory`, its W kept in external data at
    `location` (W's bytes written to `weights`); a location inside the dir is listed in `extra_files`."""
    from tests.helpers.models import onnx_linear_external

    directory = Path(directory)
    directory.mkdir(parents=True)
    for name in ("MLmodel", "requirements.txt"):
        shutil.copy(Path(linear_dir) / name, directory / name)
    (directory / "model.onnx").write_bytes(onnx_linear_external(location, Path(weights)))
    if not location.startswith(("/", "..")):
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
        mlmodel["flavors"]["arachne"]["extra_files"] = [location]
        (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory


def scaled_linear(root, scale, padding=0):
    """onnx_linear with its weights scaled: a version whose outputs differ from another scale's,
    optionally padded with an extra file of `padding` random bytes."""
    import numpy as np
    from onnx import numpy_helper

    from tests.helpers import models

    model = models.onnx_linear(1)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, "W"))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    file = root / f"linear-{scale}.onnx"
    file.write_bytes(model.SerializeToString())
    directory = write_model_dir(root / f"v-{scale}", "onnx", file, runtime_details("onnx", file))
    if padding:
        (directory / "padding.bin").write_bytes(np.random.default_rng(0).bytes(padding))
        mlmodel = yaml.safe_load((directory / "MLmodel").read_text())
        mlmodel["flavors"]["arachne"]["extra_files"] = ["padding.bin"]
        (directory / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return directory
