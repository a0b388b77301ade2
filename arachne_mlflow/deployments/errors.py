"""The deployments plugin's one error: an `MlflowException` for Python callers, and a click error for
MLflow's CLI (`mlflow deployments ...`), which then prints one line and exits 1 instead of a traceback.

MLflow's CLI lets any other exception from a plugin escape as a traceback; click catches only its
own errors. Every public method of the plugin turns a user error (an `ArachneError`, an
`MlflowException` from the registry) into this one; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, ErrorCode

from arachne_mlflow.errors import ArachneError

F = TypeVar("F", bound=Callable[..., Any])


class DeploymentError(MlflowException, click.ClickException):
    """What a deployments command tells its user (click prints `Error: <message>`, exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, error_code: int = INTERNAL_ERROR):
        MlflowException.__init__(self, message, error_code=error_code)


def user_errors(method: F) -> F:
    """`method`, raising `DeploymentError` for user errors, with the same message and error code."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except DeploymentError:
            raise
        except MlflowException as err:
            raise DeploymentError(err.message, ErrorCode.Value(err.error_code)) from err
        except ArachneError as err:
            raise DeploymentError(str(err)) from err

    return wrapper  # type: ignore[return-value]
