"""The serving runtime of one server process: the loaded model, the prediction path, feedback, the log and metrics."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

from tuneloop import prediction_log
from tuneloop.config import TuneloopConfig
from tuneloop.errors import ServiceUnavailableError
from tuneloop.prediction_log import PROBABILITY_PREFIX, PredictionLog, PredictionNotFound
from tuneloop.privacy import serving_masker
from tuneloop.serving.environment import MODEL_DIR_ENV, VERSION_ENV, load_serving_config
from tuneloop.serving.guard import RequestPolicy
from tuneloop.serving.loading import fetch_model, load_model
from tuneloop.serving.schemas import FeedbackError, FeedbackResponse, Prediction, RequestLimits

logger = logging.getLogger("tuneloop.serving")

INFERENCE_BATCH_SIZE = 8
"""Texts per forward pass inside one adaptive batch (sorted by length, so padding stays short)."""


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
