"""`ArachneJetsonDeploymentClient`: MLflow deployments onto one device server or a fleet of them."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException

from arachne_mlflow.deployments.source import ModelSource, resolve
from arachne_mlflow.deployments.targets import Device, connection, parse_devices
from arachne_mlflow.errors import ArachneError
from arachne_mlflow.model_dir import FLAVOR_NAME

_logger = logging.getLogger(__name__)


class ArachneJetsonDeploymentClient(BaseDeploymentClient):
    """Deploys `arachne` models from MLflow to device servers; several devices act as one fleet."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        self.devices = parse_devices(target_uri)

    # -- deployments --------------------------------------------------------------------
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        return self._push(name, model_uri, flavor, config, replace=False)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        if model_uri is None:
            raise MlflowException(f"update of deployment {name!r} needs a model URI (-m)")
        return self._push(name, model_uri, flavor, config, replace=True)

    def delete_deployment(self, name, config=None, endpoint=None):
        results = self._each(config, lambda client, device: client.delete_model(name))
        failed = {d: e for d, e in results.items() if isinstance(e, Exception)}
        if len(failed) == len(self.devices):
            raise MlflowException(f"could not delete deployment {name!r}: {_report(failed)}")
        if failed:
            warnings.warn(f"deployment {name!r} deleted except on: {_report(failed)}", stacklevel=2)

    def list_deployments(self, endpoint=None):
        found: dict[str, dict[str, Any]] = {}
        results = self._each(None, lambda client, device: client.repository_index())
        for device, models in results.items():
            if isinstance(models, Exception):
                warnings.warn(f"device {device} not listed: {models}", stacklevel=2)
                continue
            for entry in models:
                item = found.setdefault(entry["name"], {"name": entry["name"], "flavor": FLAVOR_NAME, "devices": []})
                item["devices"].append({"device": str(device), "state": entry.get("state")})
        return sorted(found.values(), key=lambda d: d["name"])

    def get_deployment(self, name, endpoint=None):
        results = self._each(None, lambda client, device: client.model_info(name))
        found = {d: info for d, info in results.items() if not isinstance(info, Exception)}
        if not found:
            raise MlflowException(f"no deployment {name!r} on {_names(self.devices)}: {_report(results)}")
        first = next(iter(found.values()))
        deployment = {"name": name, "flavor": FLAVOR_NAME, **(first.get("info") or {})}
        deployment["devices"] = [
            {
                "device": str(device),
                "state": info.get("state") if not isinstance(info, Exception) else "absent",
                "deployed_at": (info.get("info") or {}).get("deployed_at") if not isinstance(info, Exception) else None,
                "digest": info.get("digest") if not isinstance(info, Exception) else None,
                **({"error": str(info)} if isinstance(info, Exception) else {}),
            }
            for device, info in results.items()
        ]
        return deployment

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        arrays = _as_arrays(inputs)
        errors = {}
        for device in self.devices:  # the first device that answers serves the request
            try:
                outputs = self._client(device, None).infer(deployment_name, arrays)
            except ArachneError as err:
                errors[device] = err
                if getattr(err, "status_code", 500) < 500:
                    break  # the request itself is wrong; another device will say the same
                continue
            values = list(outputs.values())
            predictions = values[0].tolist() if len(values) == 1 else {k: v.tolist() for k, v in outputs.items()}
            return PredictionsResponse({"predictions": predictions})
        raise MlflowException(f"prediction with deployment {deployment_name!r} failed: {_report(errors)}")

    # -- helpers ------------------------------------------------------------------------
    def _push(self, name: str, model_uri: str, flavor: str | None, config: dict | None, replace: bool) -> dict:
        if flavor not in (None, FLAVOR_NAME):
            raise MlflowException(f"the {self.target_uri} target deploys the {FLAVOR_NAME!r} flavor, not {flavor!r}")
        with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
            try:
                source = resolve(model_uri, tmp)
            except ArachneError as err:
                raise MlflowException(f"cannot deploy {model_uri}: {err}") from err
            progress = sys.stderr.isatty() and len(self.devices) == 1
            results = self._each(config, lambda client, device: self._push_one(client, device, name, source, progress))
        failed = {d: r for d, r in results.items() if isinstance(r, Exception)}
        states = [
            {"device": str(d), "state": "failed", "error": str(r)} if isinstance(r, Exception)
            else {"device": str(d), "state": "ready", "uploaded": bool(r)}
            for d, r in results.items()
        ]
        action = "update" if replace else "create"
        if len(failed) == len(self.devices):
            raise MlflowException(f"{action} of deployment {name!r} failed on every device: {_report(failed)}")
        if failed:
            warnings.warn(
                f"{action} of deployment {name!r} failed on {_report(failed)}; the other devices have the new version",
                stacklevel=3,
            )
        return {"name": name, "flavor": FLAVOR_NAME, "model_uri": model_uri, "runtime": source.model.runtime,
                "devices": states, **{k: v for k, v in source.info.items() if k in ("registered_model", "version", "alias")}}

    @staticmethod
    def _push_one(client, device: Device, name: str, source: ModelSource, progress: bool) -> bool:
        """Check the device can run the model, then stream its files; True when uploaded."""
        check_device_can_run(client.server_metadata(), source, device)
        return client.upload_model(name, source.model.path, files=source.model.files(), info=source.info,
                                   progress=progress)

    def _client(self, device: Device, config: dict | None):
        from arachne_mlflow.client import DeviceClient

        conn = connection(config)
        return DeviceClient(device.host, device.port, token=conn.token, tls=conn.tls, ca_cert=conn.ca_cert,
                            timeout=conn.timeout)

    def _each(self, config: dict | None, action: Callable[[Any, Device], Any]) -> dict[Device, Any]:
        """Run `action(client, device)` on every device in parallel; errors come back as values."""

        def one(device: Device) -> Any:
            try:
                return action(self._client(device, config), device)
            except ArachneError as err:
                return err

        with ThreadPoolExecutor(max_workers=min(16, len(self.devices))) as pool:
            return dict(zip(self.devices, pool.map(one, self.devices)))


def check_device_can_run(metadata: dict[str, Any], source: ModelSource, device: Device) -> None:
    """Refuse before pushing: the device lacks the runtime, or TVM code built for another CPU."""
    from arachne_mlflow.errors import IncompatibleModelError

    model = source.model
    runtimes = metadata.get("runtimes") or {}
    if model.runtime not in runtimes:
        raise IncompatibleModelError(
            f"device {device} has no {model.runtime!r} runtime (it has {sorted(runtimes)}): "
            f"pip install 'arachne-mlflow[{model.runtime}]' there"
        )
    arch = model.tvm.get("arch")
    if model.runtime == "tvm" and arch and metadata.get("arch") and arch != metadata["arch"]:
        raise IncompatibleModelError(
            f"device {device} is {metadata['arch']} but the TVM model was compiled for {arch}"
        )


def _as_arrays(inputs: Any) -> Any:
    """An ndarray, a dict of arrays, a DataFrame, or the DataFrame `mlflow deployments predict` builds."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        if list(inputs.columns) == ["inputs"]:  # {"inputs": ...} read by pd.read_json
            column = inputs["inputs"]
            if isinstance(inputs.index, pd.RangeIndex):
                return np.array(column.tolist())
            return {str(k): np.array(v) for k, v in column.items()}
        return {str(c): np.stack(inputs[c].map(np.asarray).tolist()) if inputs[c].dtype == object
                else inputs[c].to_numpy() for c in inputs.columns}
    if isinstance(inputs, dict):
        return {k: np.asarray(v) for k, v in inputs.items()}
    return np.asarray(inputs)


def _names(devices: list[Device]) -> str:
    return ", ".join(str(d) for d in devices)


def _report(results: dict[Device, Any]) -> str:
    return "; ".join(f"{device}: {error}" for device, error in results.items())
