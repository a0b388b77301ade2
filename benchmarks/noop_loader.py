"""A pyfunc loader that does nothing: it measures the floor MLflow's `PyFuncModel.predict` costs."""

from __future__ import annotations


class _Identity:
    def predict(self, data, params=None):
        return data


def _load_pyfunc(path):
    return _Identity()
