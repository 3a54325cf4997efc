"""Serving logic behind the BentoML service in ``serving/service.py``: everything but the decorators.

- Request and response models (:class:`PredictRequest`, :class:`Prediction`, :class:`FeedbackRequest`,
  :class:`FeedbackResponse`) and the input limits of ``deployment`` (:class:`RequestLimits`).
- :class:`RequestGuard`, the ASGI middleware in front of the API: optional API key, body size, JSON
  and schema checks. Every problem with a request's content ends in a 4xx with a message that says
  what was wrong (400 unreadable body, 401 key, 413 body too large, 415 media type, 422 content);
  nothing a client sends can reach the model in a shape that makes it fail with a 5xx.
- :func:`fetch_model`: a registry version (the ``champion`` alias by default) downloaded once into
  ``<state_dir>/serving/models/<model>/<version>``.
- :class:`ServingRuntime`: the loaded model, prediction and feedback.

Every served text gets its own ``request_id`` and one record in the prediction log
(:mod:`tuneloop.prediction_log`: the format, the buffered writer, the lookup). ``POST /feedback``
takes one of those ids and the true label; any replica accepts it, for a request any replica served:
the id names the partition of the shared log to look in. A prediction log that cannot be written
never fails a request: records wait in memory (``deployment.log_max_buffered``), beyond that they are
dropped and counted (``tuneloop_prediction_log_dropped_total``). Serving needs no database per request.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, ValidationInfo, field_validator

from tuneloop.config import TuneloopConfig, load_config, resolve_config_paths
from tuneloop import prediction_log
from tuneloop.errors import ModelError, RegistryError, ServiceUnavailableError, TuneloopError
from tuneloop.prediction_log import PROBABILITY_PREFIX, PredictionLog, PredictionNotFound
from tuneloop.privacy import serving_masker

logger = logging.getLogger("tuneloop.serving")

STAGE = "serving"
CONFIG_ENV = "TUNELOOP_CONFIG"
VERSION_ENV = "TUNELOOP_MODEL_VERSION"
MODEL_DIR_ENV = "TUNELOOP_MODEL_DIR"
"""A local (Compressed) Model directory to serve instead of a registry version (tests, benchmarks,
images with a baked-in model); its version label is ``$TUNELOOP_MODEL_VERSION`` or ``local``."""
MODEL_CACHE_ENV = "TUNELOOP_MODEL_CACHE_DIR"
"""Where downloaded model versions are kept (default ``$XDG_CACHE_HOME/tuneloop/models``, else
``<state_dir>/serving/models``)."""
DEFAULT_CONFIG = "tuneloop.yaml"
WORKDIR_ENV = "TUNELOOP_WORKDIR"
"""The directory a relative ``$TUNELOOP_CONFIG``, ``state_dir`` and log path are taken against.
``bentoml serve serving/`` runs its workers inside ``serving/``, so the default is ``$PWD`` (the
directory the server was started from, as the shell recorded it) before the worker's own directory;
``tuneloop serve`` sets it explicitly."""
API_KEY_HEADER = "X-API-Key"
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
"""Probe and metrics paths, reachable without the API key."""
PREDICT_PATH = "/predict"
FEEDBACK_PATH = "/feedback"
INFERENCE_BATCH_SIZE = 8
"""Texts per forward pass inside one adaptive batch (sorted by length, so padding stays short)."""
WARMUP_TEXT = "tuneloop warm-up"
_COMPLETE_MARKER = ".tuneloop-complete"


# --------------------------------------------------------------------------------------------
# Request and response models


@dataclass(frozen=True)
class RequestLimits:
    """Input limits of one request, from ``deployment``."""

    max_text_chars: int = 5000
    max_batch_items: int = 64
    max_body_bytes: int = 1_048_576

    @classmethod
    def from_config(cls, config: TuneloopConfig) -> "RequestLimits":
        deployment = config.deployment
        return cls(deployment.max_text_chars, deployment.max_batch_items, deployment.max_body_bytes)


class PredictRequest(BaseModel):
    """``POST /predict``: ``{"texts": ["...", ...]}``, one to ``deployment.max_batch_items`` non-empty
    texts of at most ``deployment.max_text_chars`` characters each."""

    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(min_length=1, description="The texts to classify, one result each.")

    @field_validator("texts")
    @classmethod
    def _within_limits(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {index} is empty (or only whitespace)")
        limits = (info.context or {}).get("limits")
        if limits is not None:
            if len(texts) > limits.max_batch_items:
                raise ValueError(
                    f"{len(texts)} texts in one request, more than the limit of {limits.max_batch_items} "
                    f"(deployment.max_batch_items)"
                )
            for index, text in enumerate(texts):
                if len(text) > limits.max_text_chars:
                    raise ValueError(
                        f"text {index} has {len(text)} characters, more than the limit of "
                        f"{limits.max_text_chars} (deployment.max_text_chars)"
                    )
        return texts


class Prediction(BaseModel):
    """The result for one text."""

    request_id: str = Field(description="Id of this prediction; send it with the true label to /feedback.")
    label: str = Field(description="The most probable label.")
    confidence: float = Field(description="Probability of that label.")
    probabilities: dict[str, float] = Field(description="Probability of every label; they sum to 1.")
    model_version: str = Field(description="Registry version of the model that answered.")


class FeedbackRequest(BaseModel):
    """``POST /feedback``: the true label of an earlier prediction."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=128)
    label: StrictStr = Field(min_length=1, max_length=256)


class FeedbackResponse(BaseModel):
    """What ``/feedback`` recorded."""

    request_id: str
    label: str
    predicted_label: str | None = None
    model_version: str | None = None
    recorded: bool = True


class FeedbackError(TuneloopError):
    """Feedback that cannot be recorded; ``status`` is the HTTP status to answer with, ``retry_after``
    (seconds) the ``Retry-After`` header when trying again later may succeed."""

    def __init__(self, message: str, *, status: int, retry_after: int | None = None, **context: Any) -> None:
        super().__init__(message, stage=STAGE, **context)
        self.status = status
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


# --------------------------------------------------------------------------------------------
# The ASGI guard


@dataclass(frozen=True)
class RequestPolicy:
    """What the guard enforces: limits, and the API key when one is configured."""

    limits: RequestLimits
    api_key: str | None = None


REQUEST_MODELS: dict[str, type[BaseModel]] = {PREDICT_PATH: PredictRequest, FEEDBACK_PATH: FeedbackRequest}


class RequestGuard:
    """ASGI middleware: API key, body size, JSON and schema of ``/predict`` and ``/feedback`` bodies.

    Args:
        app: the wrapped ASGI app.
        policy: returns the current :class:`RequestPolicy`, or None while the service is not loaded
            (then only probe paths answer; everything else gets 503).
        models: request model of each POST path that the guard validates.
    """

    def __init__(
        self,
        app: Callable,
        policy: Callable[[], RequestPolicy | None],
        models: Mapping[str, type[BaseModel]] | None = None,
    ) -> None:
        self.app = app
        self.policy = policy
        self.models = dict(REQUEST_MODELS if models is None else models)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        if policy is None:
            await _error(scope, receive, send, 503, "the model is not loaded yet; retry when /readyz answers 200")
            return
        if policy.api_key and not _key_matches(scope, policy.api_key):
            await _error(scope, receive, send, 401, f"missing or wrong {API_KEY_HEADER} header",
                         headers={"WWW-Authenticate": API_KEY_HEADER})
            return
        model = self.models.get(path) if scope.get("method") == "POST" else None
        if model is None:
            await self.app(scope, receive, send)
            return
        await self._validated(scope, receive, send, model, policy.limits)

    async def _validated(self, scope, receive, send, model: type[BaseModel], limits: RequestLimits) -> None:
        headers = _headers(scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type.startswith("multipart/"):
            await _error(scope, receive, send, 415, f"send a JSON body (Content-Type: application/json), not "
                                                    f"{media_type!r}")
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _error(scope, receive, send, 400, f"invalid Content-Length header {declared!r}")
                return
            if int(declared) > limits.max_body_bytes:
                await _error(scope, receive, send, 413, _too_large(int(declared), limits))
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limits.max_body_bytes:
                await _error(scope, receive, send, 413, _too_large(len(body), limits))
                return
            more = message.get("more_body", False)
        if not bytes(body).strip():
            await _error(scope, receive, send, 400, f"empty request body: send JSON like {_example(model)}")
            return
        try:
            model.model_validate_json(bytes(body), context={"limits": limits})
        except ValidationError as error:
            status, message = _describe(error, model)
            await _error(scope, receive, send, status, message, detail=_details(error))
            return
        await self.app(_json_scope(scope, len(body)), _replay(bytes(body), receive), send)


def _headers(scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


def _key_matches(scope, expected: str) -> bool:
    given = _headers(scope).get(API_KEY_HEADER.lower(), "")
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _too_large(size: int, limits: RequestLimits) -> str:
    return (f"request body of {size} bytes is larger than the limit of {limits.max_body_bytes} bytes "
            f"(deployment.max_body_bytes)")


def _example(model: type[BaseModel]) -> str:
    if model is FeedbackRequest:
        return '{"request_id": "...", "label": "..."}'
    return '{"texts": ["..."]}'


def _describe(error: ValidationError, model: type[BaseModel]) -> tuple[int, str]:
    problems = error.errors(include_url=False, include_context=False, include_input=False)
    if any(problem["type"] == "json_invalid" for problem in problems):
        return 400, f"request body is not valid JSON ({problems[0]['msg']}); send JSON like {_example(model)}"
    lines = []
    for problem in problems:
        location = ".".join(str(part) for part in problem["loc"]) or "body"
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "too_short" and location == "texts":
            message = "the list is empty; send at least one text"
        elif problem["type"] == "model_type":
            message = f"expected a JSON object like {_example(model)}"
        lines.append(f"{location}: {message}")
    return 422, "invalid request: " + "; ".join(lines)


def _details(error: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in problem["loc"]], "type": problem["type"],
         "msg": str(problem["msg"]).removeprefix("Value error, ")}
        for problem in error.errors(include_url=False, include_context=False, include_input=False)
    ]


async def _error(scope, receive, send, status: int, message: str, *, detail: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    content: dict[str, Any] = {"error": message}
    if detail:
        content["detail"] = detail
    await JSONResponse(content, status_code=status, headers=headers)(scope, receive, send)


def _json_scope(scope, length: int):
    headers = [(key, value) for key, value in scope.get("headers", [])
               if key.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --------------------------------------------------------------------------------------------
# Model loading


@dataclass
class LoadedModel:
    """A model ready to serve: its registry version, local directory and classifier."""

    version: str
    directory: Path
    classifier: Any

    @property
    def labels(self) -> list[str]:
        return list(self.classifier.labels)

    @property
    def runtime(self) -> str:
        return getattr(self.classifier, "runtime", type(self.classifier).__name__)


def model_cache_dir(config: TuneloopConfig, environ: Mapping[str, str] | None = None) -> Path:
    """Where downloaded registry versions are kept, per model name: ``$TUNELOOP_MODEL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tuneloop/models`` (a pod with a read-only root file system sets it to a volume),
    else ``<state_dir>/serving/models``."""
    environ = os.environ if environ is None else environ
    if environ.get(MODEL_CACHE_ENV):
        root = Path(environ[MODEL_CACHE_ENV])
    elif environ.get("XDG_CACHE_HOME"):
        root = Path(environ["XDG_CACHE_HOME"]) / "tuneloop" / "models"
    else:
        root = Path(config.state_dir) / "serving" / "models"
    return root / _safe_name(config.registry.model_name)


def fetch_model(config: TuneloopConfig, version: str | None = None) -> tuple[str, Path]:
    """Resolve ``version`` (None: the ``champion`` alias) and download it once into the cache.

    Returns:
        the version and the local Compressed Model directory.

    Raises:
        RegistryError: no champion, an unknown or malformed version, or the download failed.
    """
    from tuneloop import registry

    name = config.registry.model_name
    if version is None:
        version = registry.alias_version(config, registry.CHAMPION)
        if version is None:
            raise RegistryError(
                f"cannot start: model {name!r} has no {registry.CHAMPION!r} alias in the registry at "
                f"{registry._safe_uri(config)}; register a model first (tuneloop run --local) or pin a version "
                f"with ${VERSION_ENV} or deployment.model_version",
                stage=STAGE, field="deployment.model_version",
            )
    version = str(version).strip()
    source = model_version_source(config, version)
    target = model_cache_dir(config) / version
    if (target / _COMPLETE_MARKER).is_file():
        return version, target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".download-{version}-", dir=target.parent))
    except OSError as error:
        raise RegistryError(f"cannot start: the model cache {target.parent} is not writable ({error}); set "
                            f"${MODEL_CACHE_ENV} to a writable folder", stage=STAGE, path=str(target.parent),
                            field=MODEL_CACHE_ENV) from error
    try:
        from mlflow.artifacts import download_artifacts

        local = Path(download_artifacts(artifact_uri=source, dst_path=str(scratch), tracking_uri=config.tracking_uri))
        (local / _COMPLETE_MARKER).write_text(source, encoding="utf-8")
        try:
            local.rename(target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # not another worker finishing first
                shutil.rmtree(target, ignore_errors=True)
                local.rename(target)
    except RegistryError:
        raise
    except Exception as error:
        raise RegistryError(f"cannot start: downloading version {version} of {name!r} failed: {error}",
                            stage=STAGE) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return version, target


def model_version_source(config: TuneloopConfig, version: str) -> str:
    """The artifact URI of a registered version.

    Raises:
        RegistryError: the version is not a number or does not exist (naming the ones that do).
    """
    from mlflow.exceptions import MlflowException

    from tuneloop import registry

    name = config.registry.model_name
    if not re.fullmatch(r"[0-9]+", str(version)):
        raise RegistryError(f"model version {version!r} is not a registry version number", stage=STAGE,
                            field=VERSION_ENV)
    try:
        return registry.client(config).get_model_version(name, str(version)).source
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error.error_code):
            raise RegistryError(f"registry unreachable at {registry._safe_uri(config)}: {error}",
                                stage=STAGE) from error
    known = [row["version"] for row in registry.list_versions(config)]
    raise RegistryError(
        f"model version {version} of {name!r} does not exist in the registry at {registry._safe_uri(config)} "
        f"(registered versions: {', '.join(reversed(known)) or 'none'})",
        stage=STAGE, field="deployment.model_version",
    )


def load_model(directory: str | Path, version: str) -> LoadedModel:
    """Load a (Compressed) Model directory and prove it predicts; a broken artifact fails here.

    Raises:
        ModelError: the artifact is missing, corrupt, or cannot run on this machine.
    """
    from tuneloop.runtime import load_classifier

    directory = Path(directory)
    try:
        with _serving_threads():
            classifier = load_classifier(directory)
        probabilities = classifier.predict_proba([WARMUP_TEXT], batch_size=1)
    except ModelError as error:
        raise ModelError(f"cannot start: model version {version} is unusable: {error.message}",
                         stage=STAGE, path=error.path or str(directory), field=error.field) from error
    except Exception as error:
        raise ModelError(f"cannot start: model version {version} in {directory} failed a test prediction: "
                         f"{type(error).__name__}: {error}", stage=STAGE, path=str(directory)) from error
    import numpy as np

    if probabilities.shape != (1, len(classifier.labels)) or not np.all(np.isfinite(probabilities)):
        raise ModelError(f"cannot start: model version {version} in {directory} returns invalid probabilities "
                         f"{probabilities.tolist()}", stage=STAGE, path=str(directory))
    return LoadedModel(version=str(version), directory=directory, classifier=classifier)


@contextlib.contextmanager
def _serving_threads():
    """ONNX Runtime threads while loading for serving: ``$TUNELOOP_ORT_THREADS`` when set, else one
    fewer than the CPUs this process may use (at least one), leaving a core to the HTTP event loop.
    Measured on 2 CPUs: one ORT thread served more requests per second than two, whose spinning
    competed with the event loop."""
    from tuneloop.runtime import THREADS_ENV, available_cpus

    if os.environ.get(THREADS_ENV, "").strip():
        yield
        return
    with _ENV_LOCK:
        os.environ[THREADS_ENV] = str(max(1, available_cpus() - 1))
        try:
            yield
        finally:
            os.environ.pop(THREADS_ENV, None)


_ENV_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Metrics


@functools.cache
def _metrics():
    """Prometheus metrics of this process, created on first use (after BentoML has set up the
    multiprocess directory, which it does after importing the service module)."""
    import prometheus_client

    predictions = prometheus_client.Counter(
        "tuneloop_predictions", "Texts classified, by predicted label and model version.",
        labelnames=("label", "model_version"),
    )
    feedback = prometheus_client.Counter(
        "tuneloop_feedback", "Ground-truth labels received, by whether the prediction was right.",
        labelnames=("correct", "model_version"),
    )
    dropped = prometheus_client.Counter(
        "tuneloop_prediction_log_dropped", "Prediction log records dropped because the log was full or closed.",
    )
    return predictions, feedback, dropped


# --------------------------------------------------------------------------------------------
# The runtime


class ServingRuntime:
    """The model, the prediction log and the request policy of one server process.

    Args:
        config: the project config (``deployment`` and ``registry`` sections).
        version: registry version to serve; None for the champion (or, with ``model_dir``, a label).
        model_dir: serve this local directory instead of a registry version.
        api_key: required ``X-API-Key`` value; None leaves the API open.

    Raises:
        RegistryError, ModelError: the model cannot be resolved, downloaded or loaded (start-up fails).
        ServiceUnavailableError: the object store holding the prediction log does not answer.
    """

    def __init__(
        self,
        config: TuneloopConfig,
        *,
        version: str | None = None,
        model_dir: str | Path | None = None,
        api_key: str | None = None,
    ) -> None:
        self.config = config
        if model_dir is not None:
            directory, resolved = Path(model_dir), str(version or "local")
        else:
            resolved, directory = fetch_model(config, version)
        self.model = load_model(directory, resolved)
        self.request_mask = serving_masker(self.model.directory, config.privacy)
        self.limits = RequestLimits.from_config(config)
        self.policy = RequestPolicy(limits=self.limits, api_key=api_key or None)
        self._predictions_counter, self._feedback_counter, dropped = _metrics()
        self.log = PredictionLog.from_config(config, on_drop=dropped.inc)
        self.log_uri = self.log.uri
        self._closed = False
        logger.info("serving %s version %s (%s) from %s; prediction log %s (writer %s)", config.registry.model_name,
                    self.model.version, self.model.runtime, self.model.directory,
                    prediction_log.safe_uri(self.log_uri), self.log.writer_id)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "ServingRuntime":
        """Build from ``$TUNELOOP_CONFIG`` (default ``tuneloop.yaml``), ``$TUNELOOP_MODEL_VERSION``
        (default ``deployment.model_version``, else the champion), ``$TUNELOOP_MODEL_DIR`` and the API
        key variable named by ``deployment.api_key_env``."""
        environ = os.environ if environ is None else environ
        config = load_serving_config(environ)
        version = (environ.get(VERSION_ENV) or "").strip() or config.deployment.model_version
        model_dir = (environ.get(MODEL_DIR_ENV) or "").strip() or None
        api_key = environ.get(config.deployment.api_key_env) or None
        return cls(config, version=version, model_dir=model_dir, api_key=api_key)

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def ready(self) -> bool:
        return not self._closed and self.log.alive

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Classify texts (one adaptive batch), log them, and answer one :class:`Prediction` each."""
        texts = [str(text) for text in texts]
        if not texts:
            return []
        # A model trained on masked text sees requests masked by the same function (no train/serve skew).
        inputs = texts if self.request_mask is None else [self.request_mask(text) for text in texts]
        probabilities = self.model.classifier.predict_proba(inputs, batch_size=INFERENCE_BATCH_SIZE)
        labels = self.labels
        version = self.model.version
        timestamp = datetime.now(timezone.utc)
        predictions, records = [], []
        for text, row in zip(texts, probabilities.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            request_id = prediction_log.new_request_id(timestamp)
            prediction = Prediction(request_id=request_id, label=labels[best], confidence=row[best],
                                    probabilities=dict(zip(labels, row)), model_version=version)
            predictions.append(prediction)
            record = {"request_id": request_id, "timestamp": timestamp, "model_version": version, "text": text,
                      "predicted_label": prediction.label, "confidence": prediction.confidence}
            record.update({f"{PROBABILITY_PREFIX}{label}": value for label, value in zip(labels, row)})
            records.append(record)
        self.log.log_predictions(records)
        for label, count in Counter(p.label for p in predictions).items():
            self._predictions_counter.labels(label=label, model_version=version).inc(count)
        return predictions

    def record_feedback(self, request_id: str, label: str) -> FeedbackResponse:
        """Record the true label of an earlier prediction.

        The id may come from any replica: it is looked up in this process's memory, then in the shared
        prediction log (the partition its id names).

        Raises:
            FeedbackError: 422 when the label is not one the model knows; 404 for an id that no replica
                logged (with ``Retry-After`` when it is recent enough to be still unflushed); 503 when
                the prediction log's store does not answer.
        """
        if label not in self.labels:
            raise FeedbackError(f"label {label!r} is not one of the model's labels {self.labels}",
                                status=422, field="label")
        try:
            found = self.log.find(request_id)
        except PredictionNotFound as error:
            raise FeedbackError(error.message, status=404, retry_after=error.retry_after,
                                field="request_id") from error
        except ServiceUnavailableError as error:
            raise FeedbackError(f"cannot look up request_id {request_id!r} now: {error.message}", status=503,
                                retry_after=max(1, round(self.log.flush_seconds))) from error
        version, predicted = str(found["model_version"]), str(found["predicted_label"])
        self.log.log_feedback(found, label)
        self._feedback_counter.labels(correct=str(predicted == label).lower(), model_version=version).inc()
        return FeedbackResponse(request_id=request_id, label=label, predicted_label=predicted, model_version=version)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write every queued prediction and feedback record now."""
        return self.log.flush(timeout)

    def close(self) -> None:
        """Flush and stop the log writers (idempotent; called on shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.log.close()
        logger.info("prediction log closed: %d predictions, %d feedback records written, %d dropped",
                    self.log.predictions.written, self.log.feedback.written, self.log.dropped)


def stop_server_on_startup_error(error: BaseException) -> None:
    """Log why the model could not be served and, inside a ``bentoml serve`` worker, stop the whole
    server: BentoML would otherwise respawn the failing worker forever and the process would look
    alive while serving nothing. Outside a BentoML server (tests, an ASGI host) it only logs."""
    logger.error("tuneloop serving cannot start: %s", error)
    print(f"error: tuneloop serving cannot start: {error}", file=sys.stderr, flush=True)
    if "BENTOML_RUNNER_MAP" not in os.environ:
        return
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        if any("bentoml" in part for part in parent.cmdline()):
            parent.terminate()
    except Exception:  # best effort: the worker still fails
        logger.exception("could not stop the BentoML server process")


def load_serving_config(environ: Mapping[str, str] | None = None) -> TuneloopConfig:
    """The config named by ``$TUNELOOP_CONFIG`` (default ``tuneloop.yaml``), with relative paths (the
    config file itself, ``state_dir``, a local ``deployment.prediction_log_uri``) taken against
    ``$TUNELOOP_WORKDIR``, else ``$PWD``, else the working directory.

    Raises:
        ConfigError: the file is missing or invalid, or a ``world: cluster`` config keeps shared
            state on the replica's own disk.
    """
    from tuneloop.world import require_cluster_ready

    environ = os.environ if environ is None else environ
    workdir = Path(environ.get(WORKDIR_ENV) or environ.get("PWD") or os.getcwd())
    if not workdir.is_dir():
        workdir = Path.cwd()
    path = Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    path = path if path.is_absolute() else workdir / path
    config = load_config(path, resolve_paths=False)
    if not Path(config.state_dir).is_absolute():
        config.state_dir = workdir / config.state_dir
    log_uri = config.deployment.prediction_log_uri
    if log_uri and "://" not in log_uri and not Path(log_uri).is_absolute():
        config.deployment.prediction_log_uri = str(workdir / log_uri)
    if config.world == "cluster":
        require_cluster_ready(config, action="serve")
    return resolve_config_paths(config, base_dir=path.resolve().parent)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"

