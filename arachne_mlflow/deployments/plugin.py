"""`ArachneJetsonDeploymentClient`: MLflow deployments onto one device server or a fleet of them.

Every command talks to each device of the target in parallel and reports each one. A push that
fails on some devices warns, naming them with their errors, and the others keep the new version;
a command that fails on every device raises `MlflowException`.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from arachne_mlflow.deployments.inputs import to_arrays
from arachne_mlflow.deployments.source import ModelSource, resolve
from arachne_mlflow.deployments.targets import Device, connection, flag, parse_devices
from arachne_mlflow.errors import (
    ArachneError,
    DeviceUnreachableError,
    IncompatibleModelError,
    InvalidInputError,
    ModelNotFoundError,
)
from arachne_mlflow.model.arch import normalize_arch
from arachne_mlflow.model.directory import FLAVOR_NAME

# Models at least this large get a progress bar when stderr is a terminal (`-C progress=...` decides otherwise).
PROGRESS_MIN_BYTES = 1 << 20


class ArachneJetsonDeploymentClient(BaseDeploymentClient):
    """Deploys `arachne` models from MLflow to device servers; several devices act as one fleet.

    Connection settings come from each call's `config` where MLflow passes one (create, update,
    delete), else from the environment (`ARACHNE_TOKEN`, `ARACHNE_TLS`, ...).
    """

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        try:
            self.devices = parse_devices(target_uri)
        except InvalidInputError as err:
            raise MlflowException(str(err)) from err

    # -- deployments ---------------------------------------------------------------------
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Push the model to every device; a device that already has `name` refuses (use update)."""
        return self._push(name, model_uri, flavor, config, replace=False)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Replace `name` on every device that has it; each serves the old version until the new one loads."""
        if model_uri is None:
            raise MlflowException(f"update of deployment {name!r} needs a model URI (-m)")
        return self._push(name, model_uri, flavor, config, replace=True)

    def delete_deployment(self, name, config=None, endpoint=None):
        """Remove `name` from every device. Idempotent, as MLflow's contract asks: a device that does
        not have it (any more) is not an error, so deleting twice succeeds."""
        results = self._each(config, lambda device, client: client.delete_model(name))
        failed = {d: r for d, r in _failures(results).items() if not isinstance(r, ModelNotFoundError)}
        if len(failed) == len(self.devices):
            raise MlflowException(f"could not delete deployment {name!r}: {_report(failed)}")
        if failed:
            warnings.warn(f"deployment {name!r} deleted except on {_report(failed)}", stacklevel=2)

    def list_deployments(self, endpoint=None):
        """Every deployment on any device, with the devices that hold it and its state there."""
        results = self._each(None, lambda device, client: client.repository_index())
        failed = _failures(results)
        if len(failed) == len(self.devices):
            raise MlflowException(f"could not list deployments: {_report(failed)}")
        if failed:
            warnings.warn(f"deployments not listed on {_report(failed)}", stacklevel=2)
        found: dict[str, dict[str, Any]] = {}
        for device, entries in results.items():
            for entry in [] if device in failed else entries:
                item = found.setdefault(entry["name"], {"name": entry["name"], "flavor": FLAVOR_NAME, "devices": []})
                item["devices"].append({"device": str(device), "state": entry["state"]})
        return sorted(found.values(), key=lambda item: item["name"])

    def get_deployment(self, name, endpoint=None):
        """Provenance, runtime and signature of the newest copy, and the state on each device."""

        def describe(device: Device, client: Any) -> dict[str, Any] | None:
            record = client.model_record(name)
            if record is not None:
                record["metadata"] = client.model_metadata(name)
            return record

        results = self._each(None, describe)
        records = {d: r for d, r in results.items() if isinstance(r, dict)}
        if not records:
            failed = _failures(results)
            raise MlflowException(
                f"no deployment {name!r} on {_names(self.devices)}" + (f" ({_report(failed)})" if failed else ""),
                error_code=RESOURCE_DOES_NOT_EXIST,
            )
        latest = max(records.values(), key=lambda r: r["uploaded_at"])
        metadata = latest["metadata"]
        return {
            "name": name,
            "flavor": FLAVOR_NAME,
            "runtime": latest["runtime"],
            **latest["provenance"],
            "signature": {"inputs": metadata["inputs"], "outputs": metadata["outputs"]},
            "deployed_at": latest["uploaded_at"],
            "devices": [_device_state(d, results[d]) for d in self.devices],
        }

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Run the deployment on the first device that answers; returns `{"predictions": ...}`.

        One output comes back as nested lists, several as a dict name -> nested lists. A device
        that is down or lacks the deployment passes the request on; bad input stops at the first.
        """
        errors: dict[Device, Exception] = {}
        for device in self.devices:
            try:
                with self._client(device, None) as client:
                    arrays = to_arrays(inputs, client.model_metadata(deployment_name)["inputs"])
                    outputs = client.infer(deployment_name, arrays)
            except ArachneError as err:
                errors[device] = err
                if isinstance(err, InvalidInputError):
                    break  # another device would say the same
                continue
            values = {key: value.tolist() for key, value in outputs.items()}
            return PredictionsResponse({"predictions": next(iter(values.values())) if len(values) == 1 else values})
        raise MlflowException(f"prediction with deployment {deployment_name!r} failed: {_report(errors)}")

    # -- helpers -------------------------------------------------------------------------
    def _push(self, name: str, model_uri: str, flavor: str | None, config: dict | None, replace: bool) -> dict:
        if flavor not in (None, FLAVOR_NAME):
            raise MlflowException(f"target {self.target_uri} deploys the {FLAVOR_NAME!r} flavor, not {flavor!r}")
        config = dict(config or {})
        progress = config.pop("progress", None)
        _check_config(config)
        action = "update" if replace else "create"
        with tempfile.TemporaryDirectory(prefix="arachne-deploy-") as tmp:
            try:
                source = resolve(model_uri, tmp)
                progress = flag("progress", progress, sys.stderr.isatty() and source.size >= PROGRESS_MIN_BYTES)
            except ArachneError as err:
                raise MlflowException(f"cannot deploy {model_uri}: {err}") from err
            results = self._each(
                config, lambda device, client: _push_one(device, client, name, source, replace, progress)
            )
        failed = _failures(results)
        if len(failed) == len(self.devices):
            raise MlflowException(f"{action} of deployment {name!r} failed: {_report(failed)}")
        if failed:
            done = ", ".join(f"{d} ({r})" for d, r in results.items() if d not in failed)
            warnings.warn(
                f"{action} of deployment {name!r} failed on {_report(failed)}; the new version is on {done}",
                stacklevel=3,
            )
        return {
            "name": name,
            "flavor": FLAVOR_NAME,
            "runtime": source.model.runtime,
            **source.provenance,
            "devices": [
                {"device": str(d), "state": "failed", "error": str(r)}
                if d in failed
                else {"device": str(d), "state": r}
                for d, r in results.items()
            ],
        }

    def _client(self, device: Device, config: dict | None):
        from arachne_mlflow.client import DeviceClient

        conn = connection(config)
        return DeviceClient(
            device.host, device.port, token=conn.token, tls=conn.tls, ca_cert=conn.ca_cert, timeout=conn.timeout
        )

    def _each(self, config: dict | None, action: Callable[[Device, Any], Any]) -> dict[Device, Any]:
        """`action(device, client)` on every device in parallel; an `ArachneError` comes back as the result."""
        _check_config(config)

        def one(device: Device) -> Any:
            try:
                with self._client(device, config) as client:
                    return action(device, client)
            except ArachneError as err:
                return err

        with ThreadPoolExecutor(max_workers=min(16, len(self.devices))) as pool:
            return dict(zip(self.devices, pool.map(one, self.devices)))


def _push_one(device: Device, client: Any, name: str, source: ModelSource, replace: bool, progress: bool) -> str:
    """Check that the device can run the model and may take it, then stream its files; the device's new state."""
    check_device_can_run(client.server_metadata(), source, device)
    stored = client.model_record(name)
    if replace and stored is None:
        raise ModelNotFoundError(f"device {device} has no deployment {name!r} to update: create it")
    if not replace and stored is not None:
        raise InvalidInputError(f"device {device} already has a deployment {name!r}: update it")
    if stored is not None and stored["digest"] == source.digest and stored["provenance"] == source.provenance:
        return "unchanged"
    client.upload_model(
        name, source.model.path, files=source.files, provenance=source.provenance, progress=progress, force=True
    )
    return "deployed"


def check_device_can_run(metadata: dict[str, Any], source: ModelSource, device: Device) -> None:
    """Refuse before pushing: the device lacks the model's runtime, or, for TVM, its CPU or device."""
    model = source.model
    runtimes = {r["name"]: r for r in metadata.get("runtimes", [])}
    if model.runtime not in runtimes:
        raise IncompatibleModelError(
            f"device {device} has no {model.runtime!r} runtime (it has {sorted(runtimes)}): "
            f"pip install 'arachne-mlflow[device-{model.runtime}]' there"
        )
    if model.runtime != "tvm":
        return
    arch, kind = model.tvm.get("arch"), model.tvm.get("device", "cpu")
    if arch and normalize_arch(arch) != normalize_arch(metadata.get("arch") or "unknown"):
        raise IncompatibleModelError(
            f"device {device} is {metadata.get('arch')} but the TVM model was compiled for {arch}"
        )
    devices = runtimes["tvm"].get("devices")
    if devices is not None and kind not in devices:
        raise IncompatibleModelError(f"device {device} has no TVM device {kind!r} (it has {devices})")


def _check_config(config: dict | None) -> None:
    try:
        connection(config)
    except InvalidInputError as err:
        raise MlflowException(str(err)) from err


def _device_state(device: Device, result: Any) -> dict[str, Any]:
    """One device's view of a deployment: which registered version it serves, since when, in what state."""
    if isinstance(result, Exception):
        state = "unreachable" if isinstance(result, DeviceUnreachableError) else "error"
        return {"device": str(device), "state": state, "error": str(result)}
    if result is None:
        return {"device": str(device), "state": "absent"}
    provenance = {k: v for k, v in result["provenance"].items() if k in ("model_uri", "registered_model", "version")}
    return {
        "device": str(device),
        "state": result["state"],
        **provenance,
        "revision": result["revision"],
        "deployed_at": result["uploaded_at"],
        "digest": result["digest"],
        **({"reason": result["reason"]} if result.get("reason") else {}),
    }


def _failures(results: dict[Device, Any]) -> dict[Device, Exception]:
    return {d: r for d, r in results.items() if isinstance(r, Exception)}


def _names(devices: list[Device]) -> str:
    return ", ".join(str(d) for d in devices)


def _report(results: dict[Device, Any]) -> str:
    return "; ".join(f"{device}: {error}" for device, error in results.items())
