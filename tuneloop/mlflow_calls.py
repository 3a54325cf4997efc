"""How tuneloop talks to MLflow: one client, and calls that tell an outage from an answer.

An outage (connection refused, timeout, 429, 5xx; the object store behind MLflow's artifacts
unreachable) is retried a few times with exponential backoff (``registry.retry_attempts``,
``retry_wait_s``; a ``Retry-After`` the server sent wins when longer), then raised as
:class:`~tuneloop.errors.ServiceUnavailableError` so that KFP retries the step. An answer (4xx, not
found, refused) is never retried. MLflow's own HTTP retries are off by default
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless set in the environment), so the two never multiply.
Messages never carry credentials.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ServiceUnavailableError, TuneloopError
from tuneloop.redaction import redact_url, redact_urls

_OUTAGE_ERROR_CODES = {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                       "RESOURCE_EXHAUSTED"}
_S3_OUTAGE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "RequestTimeTooSkewed"}
T = TypeVar("T")


def client(config: TuneloopConfig):
    """An ``MlflowClient`` for the configured registry (the SQLite file's folder is created)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # retries are ours: see call()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(config.registry.request_timeout_s))))
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = config.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return call(config, "connecting to the registry", MlflowClient, tracking_uri=uri, registry_uri=uri)


def outage_service(error: BaseException, *, remote: bool = True) -> str | None:
    """The service an error shows to be unreachable (``mlflow``, ``object store``), or None when the
    error is an answer (4xx, not found, bad input) that no retry would change.

    Args:
        error: what a registry or artifact call raised.
        remote: whether the tracking store is a server; only then is MLflow's generic
            ``INTERNAL_ERROR`` (what its HTTP client raises for refused connections) an outage.
    """
    if isinstance(error, ServiceUnavailableError):
        return error.service
    if isinstance(error, TuneloopError):
        return None
    cause = getattr(error, "last_exception", None)  # boto3's RetriesExceededError wraps the real one
    if isinstance(cause, BaseException):
        return outage_service(cause, remote=remote)
    return _mlflow_outage(error, remote) or _object_store_outage(error) or _network_outage(error)


def _mlflow_outage(error: BaseException, remote: bool) -> str | None:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return None
    if not isinstance(error, MlflowException):
        return None
    code = str(error.error_code)
    if code in _OUTAGE_ERROR_CODES or (remote and code == "INTERNAL_ERROR"):
        return "mlflow"
    return "mlflow" if remote and error.get_http_status_code() in (502, 503, 504) else None


def _object_store_outage(error: BaseException) -> str | None:
    try:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
    except ImportError:
        return None
    if isinstance(error, (ConnectionError, HTTPClientError)):  # unreachable, closed, timed out
        return "object store"
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = error.response.get("Error", {}).get("Code", "")
        return "object store" if status >= 500 or status == 429 or code in _S3_OUTAGE_CODES else None
    return None


def _network_outage(error: BaseException) -> str | None:
    import requests

    if isinstance(error, requests.HTTPError):
        status = error.response.status_code if error.response is not None else 0
        return "mlflow" if status >= 500 or status == 429 else None
    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return "mlflow"
    try:
        from sqlalchemy.exc import DisconnectionError, OperationalError
    except ImportError:
        return None
    return "mlflow" if isinstance(error, (OperationalError, DisconnectionError)) else None


def _retry_after_s(error: BaseException | None) -> float:
    """A server's ``Retry-After`` in seconds, where the error carries the response; else 0."""
    headers: Any = None
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    elif response is not None:  # requests.HTTPError
        headers = getattr(response, "headers", None)
    value = (headers or {}).get("Retry-After") or (headers or {}).get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


def is_remote(config: TuneloopConfig) -> bool:
    """Whether the tracking store is a server reached over the network."""
    return config.tracking_uri.split(":", 1)[0] in ("http", "https", "databricks")


def call(config: TuneloopConfig, action: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one registry call, retrying outages briefly; the call must be safe to repeat.

    Args:
        config: ``registry.retry_attempts``, ``retry_wait_s`` and the tracking URI.
        action: what the call does, for the error message ("reading the champion alias").
        function: the call; answers (4xx, not found) propagate unchanged after the first try.

    Raises:
        ServiceUnavailableError: still an outage after the last try (service and URI named,
            credentials removed).
    """
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    remote = is_remote(config)
    backoff = wait_exponential(multiplier=config.registry.retry_wait_s, max=30.0)

    def wait(state) -> float:
        return min(60.0, max(backoff(state), _retry_after_s(state.outcome.exception())))

    retrying = Retrying(
        stop=stop_after_attempt(config.registry.retry_attempts),
        wait=wait,
        # a ServiceUnavailableError already spent its retries in a nested call: never multiply them
        retry=retry_if_exception(lambda error: not isinstance(error, ServiceUnavailableError)
                                 and outage_service(error, remote=remote) is not None),
        reraise=True,
    )
    try:
        return retrying(function, *args, **kwargs)
    except ServiceUnavailableError:
        raise
    except Exception as error:
        outage = as_outage(config, error, f"{action} ({config.registry.retry_attempts} tries)")
        if outage is None:
            raise
        raise outage from error


def as_outage(config: TuneloopConfig, error: BaseException, action: str) -> ServiceUnavailableError | None:
    """``error`` as the ServiceUnavailableError it shows (service and URI named, no credentials),
    or None when it is an answer rather than an outage."""
    if isinstance(error, ServiceUnavailableError):
        return error
    service = outage_service(error, remote=is_remote(config))
    if service is None:
        return None
    where = safe_uri(config) if service == "mlflow" else scrub(os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint"))
    return ServiceUnavailableError(f"{service} unreachable at {where} while {action}: {scrub(first_line(error))}",
                                   service=service, uri=where, stage="registry")


def safe_uri(config: TuneloopConfig) -> str:
    """The tracking URI without any credentials embedded in it (:func:`tuneloop.redaction.redact_url`)."""
    return redact_url(config.tracking_uri)


def scrub(text: str) -> str:
    """``text`` with the credentials of every URL in it hidden (error texts may quote a request URL)."""
    return redact_urls(text)


def first_line(error: BaseException) -> str:
    """The first line of an error's text (at most 400 characters), for one-line messages."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:400]
