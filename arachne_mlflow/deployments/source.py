"""Resolve an MLflow model URI to a local `arachne` model and the provenance a device records.

A registry URI (`models:/name/3`, `models:/name@alias`, `models:/name/latest`) is pinned to one
version first, with MLflow's public client API, and that version is what is downloaded: an
alias that moves meanwhile cannot mix one version's files with another's number.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from arachne_mlflow.errors import InvalidInputError
from arachne_mlflow.model.archive import tar_size
from arachne_mlflow.model.device_kind import device_kind
from arachne_mlflow.model.digest import files_digest
from arachne_mlflow.model.directory import ArachneModel, read_model_dir
from arachne_mlflow.model.signing import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    Release,
    signature_artifact_path,
    verify_files,
)
from arachne_mlflow.model.variants import VariantChoice, choose_variant
from arachne_mlflow.protocol import bounded_json

REGISTRY_PREFIX = "models:/"
PROFILE_TAG = "arachne.profile"  # the version's fastest variant per kind of device (profiling/runs.py writes it)
MAX_PROFILE_TAG = 100_000  # characters: MLflow's own bound on a registry tag value
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_quiet_guard = threading.Lock()
_quiet_downloads = 0


@dataclass(frozen=True)
class RegistryVersion:
    """The registered model version a `models:/` URI names now."""

    registered_model: str
    version: str
    alias: str | None = None
    run_id: str | None = None

    @property
    def pinned_uri(self) -> str:
        return f"{REGISTRY_PREFIX}{self.registered_model}/{self.version}"


@dataclass
class ModelSource:
    """A downloaded model, the files a push sends, their digest and the provenance stored with them.

    A model with variants is downloaded once; `for_device` is what one device gets: the variant it
    runs, with that variant's files alone (`variant_source`)."""

    model: ArachneModel
    files: list[str]
    digest: str
    size: int
    provenance: dict[str, Any]
    registry: RegistryVersion | None = None
    #: `-C variants=a,b`: the deployment's order of preference (None: the model's order).
    variant_order: tuple[str, ...] | None = None
    #: The `arachne.profile` tag: the fastest variant measured on each kind of device (its key).
    fastest: dict[str, str] = field(default_factory=dict)
    _per_variant: dict[str, ModelSource] = field(default_factory=dict, repr=False, compare=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def has_variants(self) -> bool:
        """Whether the model lists variants (a device may get another one than the host reads)."""
        return self.model.has_variants

    @property
    def variant(self) -> str | None:
        """The name of the variant this source sends (None: a model without variants)."""
        return self.model.variant_name if self.model.has_variants else None

    def choose(self, metadata: Mapping[str, Any]) -> VariantChoice:
        """The variant a device whose `GET /v2` answer is `metadata` runs: the first it can run in the
        deployment's order, else (the fastest measured on its kind first) in the model's order."""
        order = self.variant_order
        if order is None:
            names = [v.variant_name for v in self.model.variants]
            fastest = self.fastest.get(device_kind(metadata).key)
            order = tuple(dict.fromkeys([fastest, *names] if fastest in names else names))
        return choose_variant(self.model.variants, metadata, order)

    def variant_source(self, name: str) -> ModelSource:
        """This source narrowed to variant `name`: its files, their digest and size (computed once)."""
        with self._guard:
            found = self._per_variant.get(name)
            if found is None:
                model = self.model.variant(name)
                release = {f for f in self.files if f in (RELEASE_FILE, SIGNATURE_FILE)}  # signed: they travel too
                files = sorted(set(model.files()) | release)
                found = replace(
                    self,
                    model=model,
                    files=files,
                    digest=files_digest(model.path, files),
                    size=tar_size(model.path, files),
                    _per_variant={},
                    _guard=threading.Lock(),
                )
                self._per_variant[name] = found
            return found


def registry_version(model_uri: str, client: Any = None) -> RegistryVersion | None:
    """The version a `models:/` URI names now; None for other URIs and for `models:/m-<id>`."""
    if not model_uri.startswith(REGISTRY_PREFIX):
        return None
    path = model_uri[len(REGISTRY_PREFIX) :].strip("/")
    alias = None
    if "/" in path:
        name, suffix = path.split("/", 1)
    elif "@" in path:
        name, alias = path.rsplit("@", 1)
    else:
        return None  # a logged model's id: not in the registry
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias)
    elif suffix.isdigit():
        version = client.get_model_version(name, suffix)
    elif suffix.lower() == "latest":
        found = client.search_model_versions(
            f"name = {quote_filter(name)}", max_results=1, order_by=["version_number DESC"]
        )
        if not found:
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"registered model {name!r} has no versions ({model_uri})")
        version = found[0]
    else:  # a stage (deprecated in MLflow, still resolved)
        version = max(client.get_latest_versions(name, [suffix]), key=lambda v: int(v.version))
    return RegistryVersion(version.name, str(version.version), alias, version.run_id or None)


def resolve(
    model_uri: str,
    dst_path: str,
    client: Any = None,
    pinned: RegistryVersion | None = None,
    variant_order: tuple[str, ...] | None = None,
) -> ModelSource:
    """Download `model_uri` (runs:/, models:/name/1, models:/name@alias, models:/m-<id>, a path),
    the registered version `pinned` when the caller has resolved it already.

    Raises `InvalidInputError` when the model has no `arachne` flavor, naming the ones it has.
    Only the files MLmodel names are pushed, with the version's release statement and signature where it
    is signed: a registry download holds others (`registered_model_meta`) that are not part of the model.
    `variant_order` (`-C variants`) must name variants the model has.
    """
    import mlflow

    registry = pinned or registry_version(model_uri, client)
    if registry is None and ":/" not in model_uri and not Path(model_uri).exists():
        raise InvalidInputError(
            f"model {model_uri!r}: no such file or directory, and not a model URI (models:/, runs:/)"
        )
    with _no_progress_bar_off_terminal():
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=registry.pinned_uri if registry else model_uri, dst_path=dst_path
        )
    model = read_model_dir(local)
    files = sorted(set(model.files()) | set(_release_files(model.path, registry)))
    provenance: dict[str, Any] = {
        "model_uri": model_uri,
        "run_id": model.mlmodel.get("run_id"),
        "model_id": model.mlmodel.get("model_id"),
    }
    if registry is not None:
        provenance.update(registered_model=registry.registered_model, version=registry.version, alias=registry.alias)
        provenance["run_id"] = registry.run_id  # the version's run (none for a model logged outside a run)
    _check_order(model, variant_order, model_uri)
    return ModelSource(
        model,
        files,
        files_digest(model.path, files),
        tar_size(model.path, files),
        {k: v for k, v in provenance.items() if v is not None},
        registry,
        variant_order=variant_order,
        fastest=fastest_variants(registry, client) if model.has_variants and registry else {},
    )


def _check_order(model: ArachneModel, order: tuple[str, ...] | None, model_uri: str) -> None:
    """Refuse a `-C variants` order naming a variant the model does not have (a typo must not mean "none")."""
    if order is None:
        return
    names = [v.variant_name for v in model.variants]
    unknown = [name for name in order if name not in names]
    if unknown or not model.has_variants:
        raise InvalidInputError(f"config variants names {unknown or list(order)}; model {model_uri} has {names}")


def fastest_variants(registry: RegistryVersion, client: Any = None) -> dict[str, str]:
    """The version's `arachne.profile` tag as {device kind: fastest variant}; {} when it is absent
    or is not the JSON object the profiler writes (then the model's order decides)."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    tags = client.get_model_version(registry.registered_model, registry.version).tags or {}
    value = tags.get(PROFILE_TAG)
    if not value:
        return {}
    try:
        parsed = bounded_json.loads(value, f"tag {PROFILE_TAG}", max_bytes=MAX_PROFILE_TAG)
    except InvalidInputError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {
        str(kind): entry["variant"]
        for kind, entry in parsed.items()
        if isinstance(entry, dict) and isinstance(entry.get("variant"), str)
    }


def _release_files(path: Path, registry: RegistryVersion | None) -> list[str]:
    """The release statement and signature stored for a registered version (flavors/signing.py), put beside
    the model's files so that they travel with them: what a device that requires signatures verifies."""
    if registry is None:
        return []
    stored = path / signature_artifact_path(registry.registered_model, registry.version)
    found = []
    for name in (RELEASE_FILE, SIGNATURE_FILE):
        if (stored / name).is_file() and not (path / name).exists():
            shutil.copyfile(stored / name, path / name)
        if (path / name).is_file():
            found.append(name)
    return found


def is_signed(source: ModelSource) -> bool:
    """Whether the files a push sends carry a release signature (verified or not)."""
    return SIGNATURE_FILE in source.files


def verify_source(source: ModelSource, trusted: Sequence[Any]) -> Release:
    """Check what a push would send against the trusted keys, as a device would (an unsigned model, another
    key, another registered version, a changed file: refused before any device is contacted)."""
    registry = source.registry
    variant_files = {f for v in source.model.variants for f in v.variant_files()}
    return verify_files(
        source.model.path,
        set(source.files) - {SIGNATURE_FILE},
        list(trusted),
        registered_model=registry.registered_model if registry else None,
        version=int(registry.version) if registry else None,
        may_be_absent=variant_files,
    )


@contextlib.contextmanager
def _no_progress_bar_off_terminal() -> Iterator[None]:
    """MLflow's download progress bars, off while downloading when stderr is no terminal (a log file or
    a CI job gets a line per redraw); a setting of the caller's own is kept, and the variable is put
    back once the last download running in this process ends."""
    global _quiet_downloads
    on_terminal = getattr(sys.stderr, "isatty", None) is not None and sys.stderr.isatty()
    with _quiet_guard:
        quiet = not on_terminal and (_quiet_downloads > 0 or PROGRESS_BAR_VARIABLE not in os.environ)
        if quiet:
            _quiet_downloads += 1
            os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        if quiet:
            with _quiet_guard:
                _quiet_downloads -= 1
                if _quiet_downloads == 0:
                    os.environ.pop(PROGRESS_BAR_VARIABLE, None)


def quote_filter(value: str) -> str:
    """A string literal for an MLflow search filter (there is no escaping: pick the other quote)."""
    return f'"{value}"' if "'" in value else f"'{value}'"
