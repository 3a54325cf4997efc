"""One error hierarchy for tuneloop.

Every error a user can cause is a :class:`TuneloopError`. Each carries the context that names the
problem (the stage, the file, the column or config field), so the CLI can print one clear line and
exit non-zero without a traceback.
"""

from __future__ import annotations


class TuneloopError(Exception):
    """Base class of every error tuneloop raises on purpose.

    Args:
        message: what went wrong, in one sentence a user can act on.
        stage: the pipeline stage that raised it (``validation``, ``training``...), if any.
        path: the file or directory involved, if any.
        field: the config field path or data column involved, if any.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        path: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.path = str(path) if path is not None else None
        self.field = field

    def __str__(self) -> str:
        prefix = f"[{self.stage}] " if self.stage else ""
        return f"{prefix}{self.message}"


class ConfigError(TuneloopError):
    """The configuration file is missing, malformed, or holds a bad key or value."""

    exit_code = 2


class DataError(TuneloopError):
    """An input data file is missing, unreadable, or lacks a required column."""

    exit_code = 3


class DataValidationError(DataError):
    """The data was read but failed one or more critical expectations.

    Args:
        failures: one human-readable line per failed expectation.
    """

    def __init__(self, message: str, *, failures: list[str] | None = None, **context) -> None:
        super().__init__(message, **context)
        self.failures = list(failures or [])

    def __str__(self) -> str:
        lines = [super().__str__(), *(f"  - {failure}" for failure in self.failures)]
        return "\n".join(lines)


class ModelError(TuneloopError):
    """A model checkpoint or compressed artifact is missing, corrupt, or unsupported."""

    exit_code = 4


class TrainingError(TuneloopError):
    """Fine-tuning could not run or produced an unusable model."""

    exit_code = 4


class CompressionError(TuneloopError):
    """ONNX export, quantization or engine building failed."""

    exit_code = 4


class GateError(TuneloopError):
    """The evaluation gate could not be computed (the gate then does not bless)."""

    exit_code = 5


class RegistryError(TuneloopError):
    """The model registry refused an operation or holds no such version or alias."""

    exit_code = 6


class PipelineError(TuneloopError):
    """A pipeline could not be loaded, compiled, or did not finish."""

    exit_code = 7


class ServiceUnavailableError(TuneloopError):
    """A shared service (MLflow, Postgres, Redis, the object store, the KFP API) could not be reached.

    An outage is never a verdict: a step that hits one raises this, and KFP retries the step. The
    message names the service and its URI without credentials.

    Args:
        service: which service (``mlflow``, ``postgres``, ``redis``, ``object store``, ``kubeflow``).
        uri: where it was looked for, credentials removed.
    """

    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, message: str, *, service: str, uri: str | None = None, **context) -> None:
        super().__init__(message, **context)
        self.service = service
        self.uri = uri
