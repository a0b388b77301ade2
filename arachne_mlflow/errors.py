"""One error hierarchy for the package; each error carries the HTTP status the server answers with."""

from __future__ import annotations


class ArachneError(Exception):
    """Base class of every error arachne-mlflow raises on purpose."""

    status_code = 500


class InvalidInputError(ArachneError, ValueError):
    """The caller passed something the model or API cannot take (index, dtype, shape, option)."""

    status_code = 400


class UnknownRuntimeError(InvalidInputError):
    """No runtime backend is registered under the requested name."""


class DuplicateRuntimeError(ArachneError, ValueError):
    """A second, different runtime was registered under a name already taken."""


class ModelNotFoundError(ArachneError, FileNotFoundError):
    """A model file, model directory or served model does not exist."""

    status_code = 404


class MissingDependencyError(ArachneError, ImportError):
    """The DNN library a runtime needs is not installed; the message names the pip extra."""

    status_code = 503


class IncompatibleModelError(ArachneError):
    """The model cannot run on this machine (another CPU architecture, a device it lacks)."""

    status_code = 400


class UnsafeArchiveError(InvalidInputError):
    """An archive holds entries that would escape its directory or exceed a limit."""


class ModelNotReadyError(ArachneError):
    """A served model exists but is not loaded (unloaded, or its last load failed)."""

    status_code = 503


class DeviceUnreachableError(ArachneError, ConnectionError):
    """The device server cannot be reached; the message names the host and port."""

    status_code = 503


class UnauthorizedError(ArachneError):
    """A request to the device server lacks the right bearer token."""

    status_code = 401


class ConflictError(ArachneError):
    """The request conflicts with the model's state (a rollback with no previous version) or with who
    manages it (a followed model is the registry's)."""

    status_code = 409


class InsufficientStorageError(ArachneError):
    """The device's disk is full (or its quota spent): nothing of the request was kept."""

    status_code = 507


class RegistryError(ArachneError):
    """The MLflow tracking server refused a request or answered something a device cannot use."""

    status_code = 502


class RegistryUnavailableError(RegistryError, ConnectionError):
    """The tracking server cannot be reached, timed out or is overloaded (5xx, 429): try again later."""

    status_code = 503


class RegistryAuthError(RegistryError):
    """The tracking server refused the credentials (401) or the user lacks a permission (403)."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


class HealthGateError(ArachneError):
    """A device took a new version but failed its health gate (not ready, a smoke inference that
    failed, broke the signature or was too slow, errors rising after the switch)."""


class UntrustedModelError(ArachneError):
    """A model this device must verify is unsigned, signed by a key it does not trust, or signed as
    a release of another registered model."""

    status_code = 403


class TamperedModelError(InvalidInputError):
    """A model's files differ from the manifest its signature covers (a changed byte, a file added or
    removed), or the signature itself is malformed."""
