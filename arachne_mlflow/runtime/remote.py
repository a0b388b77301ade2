"""The remote backend: `runtime.init(..., rpc_info={"host", "port"})` runs the model on a device server.

`rpc_info` names the device (an address, or a fleet file's device) and how to reach it; the token
comes from it or from `$ARACHNE_TOKEN` (`rpc_info.py`).

The model file and its options are packed into a temporary MLflow-format model directory and
uploaded once under a name derived from its digest (nothing is sent when the server already
has it). Inputs stay on the client until `run()`, which is one request with binary tensors;
`benchmark()` runs on the server; `done()` deletes the model from the server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from arachne_mlflow.errors import InvalidInputError, ModelNotFoundError
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.model.spec import TensorSpec
from arachne_mlflow.protocol.datatypes import from_datatype
from arachne_mlflow.runtime.base import RuntimeModule
from arachne_mlflow.runtime.rpc_info import client_options


class RemoteRuntimeModule(RuntimeModule):
    """A model running on a device server, with the same methods as a local `RuntimeModule`.

    Modules with the identical model share it on the server; when one's `done()` removes it,
    the others upload it again on their next call (the packed directory is kept until `done()`).
    """

    def __init__(self, runtime: str, rpc_info: Mapping[str, Any], model_file: str | None = None, **options: Any):
        from arachne_mlflow.client import DeviceClient

        self.runtime_name = runtime
        self.model_name: str | None = None
        self._client = DeviceClient(**client_options(rpc_info))
        self._workdir = tempfile.TemporaryDirectory(prefix="arachne-remote-")
        try:
            self._files = _pack(Path(self._workdir.name), runtime, model_file, options).files()
            digest = files_digest(self._workdir.name, self._files)
            self.model_name = f"rpc-{runtime}-{digest.split(':')[1][:24]}"
            self._upload()
            metadata = self._client.model_metadata(self.model_name)
        except BaseException:
            self.model_name = None
            self._close()
            raise
        self._bind_specs(_specs(metadata["inputs"]), _specs(metadata["outputs"]))
        self._input_names = [spec.name for spec in self.input_specs]
        self._output_names = [spec.name for spec in self.output_specs]

    @property
    def device(self) -> str:
        """`host:port` of the device server running the model."""
        return f"{self._client.host}:{self._client.port}"

    def _infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        outputs = self._on_server(self._client.infer, self.model_name, dict(zip(self._input_names, inputs)))
        return [outputs[name] for name in self._output_names]

    def benchmark(self, warmup: int = 1, repeat: int = 10, number: int = 1) -> dict[str, float]:
        """Time the model on the device (no network in the figures)."""
        result = self._on_server(self._client.benchmark, self.model_name, warmup=warmup, repeat=repeat, number=number)
        result.pop("name", None)
        return result

    def _upload(self) -> None:
        self._client.upload_model(self.model_name, self._workdir.name, self._files)

    def _on_server(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Make `call`; if another module with the same model removed it, upload it again once."""
        if self.model_name is None:
            raise InvalidInputError("the remote module is done: create a new one with runtime.init")
        try:
            return call(*args, **kwargs)
        except ModelNotFoundError:
            self._upload()
            return call(*args, **kwargs)

    def _close(self) -> None:
        name, self.model_name = self.model_name, None
        try:
            if name is not None:
                self._client.delete_model(name)
        except ModelNotFoundError:
            pass  # another module with the identical model removed it first
        finally:
            self._client.close()
            self._workdir.cleanup()


def _pack(workdir: Path, runtime: str, model_file: str | None, options: dict[str, Any]) -> ArachneModel:
    """Write an MLflow-format model directory for `model_file` and `options` into `workdir`."""
    options = dict(options)
    content = options.pop("model_content", None)
    if (model_file is None) == (content is None):
        raise InvalidInputError(f"{runtime} runtime with rpc_info needs exactly one of model_file or model_content")
    model_name = "model" + (Path(model_file).suffix if model_file else "")
    if content is not None:
        (workdir / model_name).write_bytes(content)
    else:
        os.symlink(Path(model_file).resolve(), workdir / model_name)
    arachne: dict[str, Any] = {"runtime": runtime, "model_file": model_name}
    mlmodel: dict[str, Any] = {"flavors": {"arachne": arachne}}
    if runtime == "tvm":
        arachne["tvm"] = {"device": options.pop("tvm_device", "cpu")}
        params_file = options.pop("params_file", None)
        if params_file is not None:
            shutil.copy(params_file, workdir / "params.bin")
            arachne["tvm"]["params_file"] = "params.bin"
        spec = options.pop("model_spec", None)
        if spec is not None:
            mlmodel["signature"] = {key: _signature(spec.get(key)) for key in ("inputs", "outputs")}
    arachne["runtime_options"] = options
    try:
        text = yaml.safe_dump(mlmodel)
    except yaml.YAMLError as err:
        raise InvalidInputError(
            f"options {sorted(options)} cannot be sent to a device server (plain values only): {err}"
        ) from err
    (workdir / "MLmodel").write_text(text)
    return read_model_dir(workdir)


def _signature(specs: Any) -> str:
    items = [TensorSpec.from_dict(s).to_dict() for s in specs or ()]
    return json.dumps(
        [
            {"name": s["name"], "type": "tensor", "tensor-spec": {"dtype": s["dtype"], "shape": s["shape"]}}
            for s in items
        ]
    )


def _specs(tensors: list[dict[str, Any]]) -> list[TensorSpec]:
    return [TensorSpec.create(t["name"], from_datatype(t["datatype"]), t["shape"]) for t in tensors]
