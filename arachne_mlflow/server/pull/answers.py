"""The tracking server's answers as a following device reads them: what it follows (`ModelRef`), the
fields of a model version it uses (`ModelVersion`), and every field type-checked before use, so that a
wrongly typed or mislabelled answer is the registry's error, never a traceback or an install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arachne_mlflow.errors import InvalidInputError, RegistryError


@dataclass(frozen=True)
class ModelRef:
    """What a device follows: a registered model's alias (`models:/NAME@ALIAS`) or version (`models:/NAME/3`)."""

    registered_model: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        path = uri[len("models:/") :] if uri.startswith("models:/") else ""
        if 0 < len(path) <= 512 and path.isprintable():
            if "/" in path:
                name, version = path.split("/", 1)
                if name and version.isdigit() and len(version) <= 18:
                    return cls(name, version=str(int(version)))
            elif "@" in path:
                name, alias = path.rsplit("@", 1)
                if name and alias:
                    return cls(name, alias=alias)
        raise InvalidInputError(
            f"cannot follow {uri[:200]!r}: follow a registered model's alias or version, "
            "models:/NAME@ALIAS or models:/NAME/3"
        )

    @property
    def uri(self) -> str:
        if self.alias is not None:
            return f"models:/{self.registered_model}@{self.alias}"
        return f"models:/{self.registered_model}/{self.version}"


@dataclass
class ModelVersion:
    """The fields of a registry model version a device uses."""

    name: str
    version: str
    status: str
    run_id: str | None = None
    source: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def model_version(data: dict[str, Any], route: str) -> ModelVersion:
    """The answer's `model_version`, every field it uses type-checked (a wrong one is the registry's error)."""
    mv = data.get("model_version")
    if not isinstance(mv, dict):
        raise RegistryError(f"{route}: the tracking server's answer has no model_version object")
    fields = {key: string_field(mv, key, route) for key in ("name", "version", "status", "run_id", "source")}
    version = fields["version"] or ""
    if not version.isdigit() or len(version) > 18:
        raise RegistryError(f"{route}: the tracking server named a model version {version[:40]!r}, not a number")
    return ModelVersion(
        name=fields["name"] or "",
        version=version,
        status=fields["status"] or "",
        run_id=fields["run_id"] or None,
        source=fields["source"] or None,
        tags=tags_of(mv.get("tags", []), route, "model_version.tags"),  # (proto3 JSON leaves out empty lists)
    )


def tags_of(tags: Any, route: str, what: str) -> dict[str, str]:
    if not isinstance(tags, list) or not all(isinstance(tag, dict) for tag in tags):
        raise RegistryError(f"{route}: the tracking server's {what} is not a list of objects")
    return {string_field(tag, "key", route) or "": string_field(tag, "value", route) or "" for tag in tags}


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def object_of(data: Any, key: str, route: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, dict):
        raise RegistryError(f"{route}: the tracking server's answer has no {key} object")
    return value


def text_field(data: dict[str, Any], key: str, route: str) -> str:
    value = string_field(data, key, route)
    if not value:
        raise RegistryError(f"{route}: the tracking server's answer has no {key}")
    return value


def string_field(obj: dict[str, Any], key: str, route: str) -> str | None:
    """A string field of the answer, or None where it is left out; any other type is the registry's error."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise RegistryError(f"{route}: the tracking server's {key!r} is a {type(value).__name__}, not a string")
    return value


def named(mv: ModelVersion, route: str, name: str, version: str | None = None) -> ModelVersion:
    """`mv`, if it is the version of `name` that was asked for (an answer about another model installs nothing)."""
    if mv.name != name or (version is not None and mv.version != version):
        asked = f"{name!r} version {version}" if version is not None else repr(name)
        raise RegistryError(
            f"{route}: the tracking server answered with version {mv.version} of {mv.name[:200]!r}, "
            f"not of the model asked for ({asked[:200]})"
        )
    return mv
