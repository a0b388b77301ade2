"""`ArachneJetsonDeploymentClient`: MLflow deployments onto one device server or a fleet of them.

Every command acts on each device of the target in parallel and reports each one (a table on
stderr); `create` and `update` converge the devices to the model, batch by batch with a health
gate per device (rollout.py), and, for a registry model, record the desired state in the registry
(desired_state.py) for `arachne-mlflow fleet sync`. A command that leaves any device without what
was asked raises `DeploymentError` naming the devices, unless `-C min_success=N` (or `P%`) allows
it; a halted rollout (undone on the devices it updated) always does. `DeploymentError` is an
`MlflowException` that MLflow's CLI prints as one line (errors.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from arachne_mlflow.deployments import operations
from arachne_mlflow.deployments.capture import set_capture
from arachne_mlflow.deployments.converge import on_devices, read_device
from arachne_mlflow.deployments.desired_state import DesiredState
from arachne_mlflow.deployments.errors import DeploymentError, user_errors
from arachne_mlflow.deployments.inputs import to_arrays
from arachne_mlflow.deployments.results import FAILED
from arachne_mlflow.deployments.source import REGISTRY_PREFIX
from arachne_mlflow.deployments.targets import SCHEME, Settings, resolve_target, settings, target_of
from arachne_mlflow.errors import ArachneError, DeviceUnreachableError, InvalidInputError
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.model.directory import FLAVOR_NAME


class ArachneJetsonDeploymentClient(BaseDeploymentClient):
    """Deploys `arachne` models from MLflow to device servers; several devices act as one fleet.

    Settings come from each call's `config` where MLflow passes one (create, update, delete),
    else from the environment (`ARACHNE_TOKEN`, `ARACHNE_FLEET`, ...). The target's devices are
    resolved at each call, so a fleet file's groups are read as they are then.
    """

    @user_errors
    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        try:
            self.target = target_of(target_uri)
        except InvalidInputError as err:
            raise DeploymentError(str(err)) from err

    # -- deployments ---------------------------------------------------------------------
    @user_errors
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Push the model to every device. Refused when the deployment exists (in the registry or on
        any device) unless `-C converge=true`, which makes it an update."""
        return self._push("create", name, model_uri, flavor, config)

    @user_errors
    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Bring every device to the model (absent: create, other: replace, same: unchanged); each
        serves the old version until the new one loads. Without a model URI, the registry's."""
        return self._push("update", name, model_uri, flavor, config)

    @user_errors
    def delete_deployment(self, name, config=None, endpoint=None):
        """Remove `name` from every device and from the registry's desired state. Idempotent, as
        MLflow's contract asks: a device that does not have it (any more) is not an error. On part
        of the deployment's target, only those devices' entries go; `-C forget=true` forgets devices
        that cannot be reached (and a recorded target the fleet file no longer knows, uncontacted)."""
        options = _settings(config)
        state = _registry(None)
        existing = state.find(name) if state else None
        try:
            devices = resolve_target(self.target_uri, options.fleet)
        except InvalidInputError as err:
            if not (options.forget and state is not None and existing is not None and existing.target == self.target):
                raise DeploymentError(str(err)) from err
            outcome = operations.forget(name, state, existing)
        else:
            whole = existing is None or self._covers(existing, devices, options)
            if whole and state is not None:
                state.remove_broken(name)
            outcome = operations.delete(name, devices, options, state, existing, whole)
        self._finish(outcome, options)

    @user_errors
    def list_deployments(self, endpoint=None):
        """Every deployment on any device, with the devices that hold it and its state there (a device
        that answered without it: `absent`)."""
        options = _settings(None)
        devices = self._devices(options)
        results = self._each(devices, options, lambda client: client.repository_index())
        failed = {d: r for d, r in results.items() if isinstance(r, ArachneError)}
        if failed and len(failed) == len(devices):
            raise DeploymentError(f"could not list deployments: {_report(failed)}")
        found: dict[str, dict[str, Any]] = {}
        for device, entries in results.items():
            for entry in [] if device in failed else entries:
                item = found.setdefault(entry["name"], {"name": entry["name"], "flavor": FLAVOR_NAME, "devices": {}})
                item["devices"][device] = {"device": str(device), "state": entry["state"]}
        for item in found.values():
            absent = {"state": "absent"}
            item["devices"] = [
                item["devices"].get(d)
                or ({"state": "unreachable", "error": str(failed[d])} if d in failed else absent) | {"device": str(d)}
                for d in devices
            ]
        return sorted(found.values(), key=lambda item: item["name"])

    @user_errors
    def get_deployment(self, name, endpoint=None):
        """Provenance, runtime and signature of the newest copy, the state on each device, and what
        the registry wants (`desired`) when it records the deployment."""

        def describe(client: Any) -> dict[str, Any] | None:
            record = client.model_record(name)
            if record is not None:
                record["metadata"] = client.model_metadata(name)
            return record

        options = _settings(None)
        devices = self._devices(options)
        results = self._each(devices, options, describe)
        records = {d: r for d, r in results.items() if isinstance(r, dict)}
        if not records:
            failed = {d: r for d, r in results.items() if isinstance(r, ArachneError)}
            raise DeploymentError(
                f"no deployment {name!r} on {', '.join(map(str, devices))}"
                + (f" ({_report(failed)})" if failed else ""),
                error_code=RESOURCE_DOES_NOT_EXIST,
            )
        latest = max(records.values(), key=lambda r: r["uploaded_at"])
        metadata = latest["metadata"]
        described = {
            "name": name,
            "flavor": FLAVOR_NAME,
            "runtime": latest["runtime"],
            **latest["provenance"],
            "signature": {"inputs": metadata["inputs"], "outputs": metadata["outputs"]},
            "deployed_at": latest["uploaded_at"],
            "devices": [_device_state(d, results[d]) for d in devices],
        }
        state = _registry(None)
        desired = state.find(name) if state else None
        if desired is not None:
            described["desired"] = asdict(desired)
        return described

    @user_errors
    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Run the deployment on the first device that answers; returns `{"predictions": ...}`.

        Devices are tried in order, each asked for the model's inputs with short timeouts (a
        device that is down or hung costs seconds, not the whole timeout); one that lacks the
        deployment passes the request on; bad input stops at the first.
        """
        options = _settings(None)
        errors: dict[Device, Exception] = {}
        quick = options.connection.probing()
        for device in self._devices(options):
            try:
                with quick.client(device) as client:
                    specs = client.model_metadata(deployment_name)["inputs"]
                arrays = to_arrays(inputs, specs)
                with options.connection.client(device) as client:
                    outputs = client.infer(deployment_name, arrays)
            except ArachneError as err:
                errors[device] = err
                if isinstance(err, InvalidInputError):
                    break  # another device would say the same
                continue
            values = {key: value.tolist() for key, value in outputs.items()}
            return PredictionsResponse({"predictions": next(iter(values.values())) if len(values) == 1 else values})
        raise DeploymentError(f"prediction with deployment {deployment_name!r} failed: {_report(errors)}")

    # -- helpers -------------------------------------------------------------------------
    def _push(self, action: str, name: str, model_uri: str | None, flavor: str | None, config: dict | None) -> dict:
        if flavor not in (None, FLAVOR_NAME):
            raise DeploymentError(f"target {self.target_uri} deploys the {FLAVOR_NAME!r} flavor, not {flavor!r}")
        options = _settings(config)
        devices = self._devices(options)
        state = _registry(model_uri)
        existing = state.find(name) if state else None
        if model_uri is None:
            if existing is None:
                raise DeploymentError(f"update of deployment {name!r} needs a model URI (-m)")
            model_uri = existing.model_uri
        if action == "create" and not options.converge:
            self._refuse_existing(name, model_uri, devices, options, existing)
        if action == "update" and existing is None:
            self._refuse_missing(name, devices, options)
        whole = existing is None or options.retarget or existing.target == self.target
        try:
            outcome = operations.push(action, name, model_uri, self.target, devices, options, state, existing, whole)
        except ArachneError as err:
            raise DeploymentError(f"cannot deploy {model_uri}: {err}") from err
        if options.capture is not None:
            outcome.results = set_capture(
                outcome.results, options.connection, name, options.capture, options.workers(len(devices))
            )
        self._finish(outcome, options)
        return {
            "name": name,
            "flavor": FLAVOR_NAME,
            "runtime": outcome.runtime,
            **outcome.provenance,
            "devices": [
                {
                    "device": str(r.device),
                    "state": r.state,
                    "before": r.before,
                    "after": r.after,
                    "seconds": round(r.seconds, 3),
                    **({"variant": r.variant} if r.variant else {}),
                    **({"error": r.error} if r.state == FAILED else {}),
                }
                for r in outcome.results
            ],
        }

    def _refuse_existing(
        self, name: str, model_uri: str, devices: list[Device], options: Settings, existing: Any
    ) -> None:
        if existing is not None:
            raise DeploymentError(
                f"deployment {name!r} exists: the registry wants {existing.model_uri} on {existing.target} "
                f"(tag on registered model {existing.registered_model!r}); update it, or create with -C converge=true",
                error_code=RESOURCE_ALREADY_EXISTS,
            )
        records = self._records(name, devices, options)
        having = [
            str(d) for d, record in records.items() if isinstance(record, dict) and not _follows(record, model_uri)
        ]
        if having:
            raise DeploymentError(
                f"deployment {name!r} exists on {', '.join(having)}: update it, or create with -C converge=true",
                error_code=RESOURCE_ALREADY_EXISTS,
            )

    def _refuse_missing(self, name: str, devices: list[Device], options: Settings) -> None:
        records = self._records(name, devices, options)
        if any(isinstance(record, dict) for record in records.values()):
            return
        failed = {d: r for d, r in records.items() if isinstance(r, ArachneError)}
        raise DeploymentError(
            f"no deployment {name!r} to update on {', '.join(map(str, devices))} nor in the registry: create it"
            + (f" ({_report(failed)})" if failed else ""),
            error_code=RESOURCE_DOES_NOT_EXIST,
        )

    def _covers(self, existing: Any, devices: list[Device], options: Settings) -> bool:
        """Whether `devices` include every device of the deployment's recorded target."""
        if existing.target == self.target:
            return True
        try:  # (only parsed: a recorded address is compared with the command's, never contacted)
            recorded = resolve_target(f"{SCHEME}://{existing.target}", options.fleet)
        except InvalidInputError:
            return False
        return {d.address for d in recorded} <= {d.address for d in devices}

    def _records(self, name: str, devices: list[Device], options: Settings) -> dict[Device, Any]:
        connection = options.connection
        found = on_devices(devices, lambda d: read_device(d, connection, name), options.workers(len(devices)))
        return dict(zip(devices, found))

    def _finish(self, outcome: operations.Outcome, options: Settings) -> None:
        """The per-device table on stderr; an exception unless enough devices got what was asked."""
        if options.report:
            outcome.write()
        if not outcome.ok:
            raise DeploymentError(outcome.summary())

    def _devices(self, options: Settings) -> list[Device]:
        try:
            return resolve_target(self.target_uri, options.fleet)
        except InvalidInputError as err:
            raise DeploymentError(str(err)) from err

    def _each(self, devices: list[Device], options: Settings, action: Any) -> dict[Device, Any]:
        """`action(client)` on every device in parallel; an `ArachneError` comes back as the result."""
        connection = options.connection

        def one(device: Device) -> Any:
            try:
                with connection.client(device) as client:
                    return action(client)
            except ArachneError as err:
                return err

        return dict(zip(devices, on_devices(devices, one, options.workers(len(devices)))))


def _settings(config: dict | None) -> Settings:
    try:
        return settings(config)
    except InvalidInputError as err:
        raise DeploymentError(str(err)) from err


def _registry(model_uri: str | None) -> DesiredState | None:
    """The registry's desired state, where there is one to keep: a registry model is pushed, or a
    tracking URI is set (where an earlier push may have recorded the deployment)."""
    import mlflow

    if (model_uri or "").startswith(REGISTRY_PREFIX) or _tracking_store_exists(mlflow):
        return DesiredState()
    return None


def _tracking_store_exists(mlflow: Any) -> bool:
    """A tracking URI was set, or MLflow's default local store exists (it would be made otherwise)."""
    from pathlib import Path

    if mlflow.is_tracking_uri_set():
        return True
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).is_file()
    return Path(uri.removeprefix("file://")).is_dir()


def _follows(record: dict[str, Any], model_uri: str) -> bool:
    """A device that pulls `model_uri` itself (serve --follow): recording it is what create does."""
    return (record.get("follow") or {}).get("model_uri") == model_uri


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


def _report(results: dict[Device, Any]) -> str:
    return "; ".join(f"{device}: {error}" for device, error in results.items())
