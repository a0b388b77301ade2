"""Captured field samples on the host: `load_samples` (a model version's samples, from MLflow, as numpy
arrays or a pandas DataFrame) and `arachne-mlflow capture pull` (drain devices reached by push into
MLflow). Importing the package imports no MLflow: each function imports what it needs.
"""

from __future__ import annotations

from typing import Any


def load_samples(*args: Any, **kwargs: Any) -> Any:
    """See `arachne_mlflow.capture.load.load_samples`."""
    from arachne_mlflow.capture.load import load_samples as load

    return load(*args, **kwargs)


__all__ = ["load_samples"]
