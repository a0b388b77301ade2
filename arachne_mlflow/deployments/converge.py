"""Bring devices to a desired model: one device at a time (`push_device`), a fleet in parallel (`on_devices`).

`push_device` is the unit that rollout strategies compose (rollout.py: batches, canaries, health
gates): it never raises for a device's failure, it reports it. A device that already holds the same files
and provenance is left alone, so converging twice changes nothing the second time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from arachne_mlflow.deployments.results import (
    ABSENT,
    DELETED,
    DEPLOYED,
    FAILED,
    PULLING,
    UNCHANGED,
    UNKNOWN,
    DeviceResult,
    version_label,
)
from arachne_mlflow.deployments.source import ModelSource, RegistryVersion, is_signed, verify_source
from arachne_mlflow.deployments.targets import Settings, trusted_keys
from arachne_mlflow.errors import ArachneError, IncompatibleModelError, ModelNotFoundError, UntrustedModelError
from arachne_mlflow.fleet.connection import Connection
from arachne_mlflow.fleet.device import Device
from arachne_mlflow.model.arch import normalize_arch
from arachne_mlflow.model.device_kind import device_kind

T = TypeVar("T")
D = TypeVar("D")


def push_device(
    device: Device, connection: Connection, name: str, source: ModelSource, progress: bool = False
) -> DeviceResult:
    """Make `device` serve `source` as `name`: absent -> upload, other model -> replace, same -> unchanged."""
    start = time.perf_counter()
    registered = source.registry.registered_model if source.registry else None
    before = UNKNOWN
    try:
        with connection.client(device) as client:
            stored = client.model_record(name)
            before = version_label(stored, registered)
            if stored is not None and stored.get("follow"):
                return _pull_device(device, stored, source, before, _since(start))
            # an answering device may take long to list its runtimes the first time: the upload's wait
            metadata = client.server_metadata(timeout=connection.upload_timeout) if source.has_variants else None
            if metadata is not None:
                source = source_for_device(source, metadata, device)
            if stored is not None and stored["digest"] == source.digest and stored["provenance"] == source.provenance:
                return _unchanged(device, before, stored, source, start)
            metadata = metadata or client.server_metadata(timeout=connection.upload_timeout)
            check_device_can_run(metadata, source, device)
            check_device_takes_signature(metadata, source, device)
            client.upload_model(
                name, source.model.path, files=source.files, provenance=source.provenance, progress=progress, force=True
            )
            record = client.model_record(name)
    except ArachneError as err:
        return DeviceResult(device, FAILED, before, before, _since(start), error=str(err))
    revision = record["revision"] if record else None
    after = version_label(record, registered)
    return DeviceResult(device, DEPLOYED, before, after, _since(start), revision=revision, variant=source.variant)


def source_for_device(source: ModelSource, metadata: dict[str, Any], device: Device) -> ModelSource:
    """What `device` gets of a model with variants: the variant it runs (`ModelSource.choose`) with
    that variant's files alone; `IncompatibleModelError` naming what each variant needs when it runs none."""
    choice = source.choose(metadata)
    if choice.variant is None:
        kind = device_kind(metadata)
        raise IncompatibleModelError(
            f"no variant of the model can run on device {device} ({kind.label or kind.key}): {choice.explain()}"
        )
    return source.variant_source(choice.variant.variant_name)


def _unchanged(device: Device, label: str, stored: dict[str, Any], source: ModelSource, start: float) -> DeviceResult:
    return DeviceResult(
        device, UNCHANGED, label, label, _since(start), revision=stored["revision"], variant=source.variant
    )


def _pull_device(device: Device, stored: dict[str, Any], source: ModelSource, before: str, seconds: float):
    """A device that pulls `name` itself: fine when it follows the URI being deployed (it converges on
    its own, within its interval), a failure naming what it follows otherwise. Nothing is pushed: the
    device refuses pushes of a followed name."""
    follows, wanted = stored["follow"].get("model_uri"), source.provenance.get("model_uri")
    if follows == wanted:
        return DeviceResult(device, PULLING, before, before, seconds, revision=stored.get("revision"))
    error = (
        f"device {device} follows {follows} for this name (serve --follow), not {wanted}: move that alias, "
        "or take the device out of the target"
    )
    return DeviceResult(device, FAILED, before, before, seconds, error=error)


def unchanged_device(
    device: Device, connection: Connection, name: str, model_uri: str, pinned: RegistryVersion
) -> DeviceResult | None:
    """An `unchanged` result when `device` already serves registered version `pinned` from
    `model_uri` as `name` (a version's files never change); None when it does not, or cannot say."""
    start = time.perf_counter()
    record = read_device(device, connection, name)
    if not isinstance(record, dict):
        return None
    provenance = record.get("provenance") or {}
    held = (provenance.get("model_uri"), provenance.get("registered_model"), str(provenance.get("version")))
    if held != (model_uri, pinned.registered_model, pinned.version):
        return None
    label = version_label(record, pinned.registered_model)
    return DeviceResult(
        device,
        UNCHANGED,
        label,
        label,
        _since(start),
        revision=record.get("revision"),
        runtime=record.get("runtime"),
        provenance=provenance,
        variant=record.get("variant"),
    )


def delete_device(device: Device, connection: Connection, name: str) -> DeviceResult:
    """Remove `name` from `device`; a device without it is `absent`, which is no failure."""
    start = time.perf_counter()
    before = UNKNOWN
    try:
        with connection.client(device) as client:
            stored = client.model_record(name)
            before = version_label(stored)
            if stored is None:
                return DeviceResult(device, ABSENT, before, "-", _since(start))
            client.delete_model(name)
    except ModelNotFoundError:
        return DeviceResult(device, ABSENT, before, "-", _since(start))
    except ArachneError as err:
        return DeviceResult(device, FAILED, before, before, _since(start), error=str(err))
    return DeviceResult(device, DELETED, before, "-", _since(start))


def read_device(device: Device, connection: Connection, name: str) -> dict[str, Any] | None | ArachneError:
    """The device's record of `name` (None when it has none), or the error that prevented asking."""
    try:
        with connection.client(device) as client:
            return client.model_record(name)
    except ArachneError as err:
        return err


def on_devices(devices: Sequence[D], action: Callable[[D], T], parallel: int) -> list[T]:
    """`action(device)` for every device, `parallel` at a time; results in the devices' order.

    This is the fleet loop: `action` reports a device's failure in its result rather than raising.
    """
    if len(devices) <= 1 or parallel <= 1:
        return [action(device) for device in devices]
    with ThreadPoolExecutor(max_workers=min(parallel, len(devices)), thread_name_prefix="arachne-fleet") as pool:
        return list(pool.map(action, devices))


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
    tvm_devices = runtimes["tvm"].get("devices")
    if tvm_devices is not None and kind not in tvm_devices:
        raise IncompatibleModelError(f"device {device} has no TVM device {kind!r} (it has {tvm_devices})")


def verify_if_trusted(source: ModelSource, settings: Settings) -> None:
    """With trusted keys (`-C trust_keys`, the fleet file's `trust_keys`), the release a push would send
    is verified on the host first: a model no device should take is refused before any is contacted."""
    trusted = trusted_keys(settings)
    if trusted:
        verify_source(source, trusted)


def check_device_takes_signature(metadata: dict[str, Any], source: ModelSource, device: Device) -> None:
    """Refuse before pushing an unsigned model to a device that requires signed ones (its `GET /v2`
    says so): it would refuse it anyway, after the whole upload."""
    required = metadata.get("signatures") or {}
    if isinstance(required, dict) and required.get("required") and not is_signed(source):
        raise UntrustedModelError(
            f"device {device} requires signed models (serve --trust-key) and "
            f"{source.provenance.get('model_uri', 'this model')} is not signed: sign the registered version "
            "(arachne-mlflow sign models:/NAME/VERSION --key ...); nothing was sent"
        )


def _since(start: float) -> float:
    return time.perf_counter() - start
