"""Measuring a model's variants on the real devices, in MLflow (`arachne-mlflow profile`).

`profile.py` runs it, `measure.py` measures one variant on one device, `reference.py` gives the
inputs and the host's reference answers, `runs.py` writes MLflow's runs and the summary tag,
`table.py` prints the result, `commands.py` is the sub-command. Above `deployments/` and
`flavors/`: it uses both. Nothing is imported until used (the CLI registers the sub-command
on a device that has no MLflow).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"Plan": "measure", "ProfileResult": "profile", "profile_model": "profile"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
