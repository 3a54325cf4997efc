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

The package in modules: :mod:`~tuneloop.serving.schemas` (request and response models, limits),
:mod:`~tuneloop.serving.guard` (the ASGI guard), :mod:`~tuneloop.serving.loading` (fetching and
loading a model version), :mod:`~tuneloop.serving.runtime` (:class:`ServingRuntime`: prediction,
feedback, the log, metrics) and :mod:`~tuneloop.serving.environment` (environment variables, the
serving config, start-up errors). The top-level ``serving/`` folder holds the BentoML service itself.
"""

from tuneloop.serving.environment import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    MODEL_CACHE_ENV,
    MODEL_DIR_ENV,
    STAGE,
    VERSION_ENV,
    WORKDIR_ENV,
    load_serving_config,
    logger,
    stop_server_on_startup_error,
)
from tuneloop.serving.guard import (
    API_KEY_HEADER,
    FEEDBACK_PATH,
    OPEN_PATHS,
    PREDICT_PATH,
    REQUEST_MODELS,
    RequestGuard,
    RequestPolicy,
)
from tuneloop.serving.loading import (
    WARMUP_TEXT,
    LoadedModel,
    fetch_model,
    load_model,
    model_cache_dir,
    model_version_source,
)
from tuneloop.serving.runtime import INFERENCE_BATCH_SIZE, ServingRuntime
from tuneloop.serving.schemas import (
    FeedbackError,
    FeedbackRequest,
    FeedbackResponse,
    Prediction,
    PredictRequest,
    RequestLimits,
)

__all__ = [
    "API_KEY_HEADER",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "FEEDBACK_PATH",
    "INFERENCE_BATCH_SIZE",
    "MODEL_CACHE_ENV",
    "MODEL_DIR_ENV",
    "OPEN_PATHS",
    "PREDICT_PATH",
    "REQUEST_MODELS",
    "STAGE",
    "VERSION_ENV",
    "WARMUP_TEXT",
    "WORKDIR_ENV",
    "FeedbackError",
    "FeedbackRequest",
    "FeedbackResponse",
    "LoadedModel",
    "Prediction",
    "PredictRequest",
    "RequestGuard",
    "RequestLimits",
    "RequestPolicy",
    "ServingRuntime",
    "fetch_model",
    "load_model",
    "load_serving_config",
    "logger",
    "model_cache_dir",
    "model_version_source",
    "stop_server_on_startup_error",
]
