"""The tuneloop BentoML service: a compressed text classifier behind adaptive batching.

Run it with ``bentoml serve serving/`` (or ``tuneloop serve``). It reads the project config from
``$TUNELOOP_CONFIG`` (default ``tuneloop.yaml``) and serves the registry's ``champion``, or the
version pinned by ``$TUNELOOP_MODEL_VERSION`` / ``deployment.model_version`` (``$TUNELOOP_MODEL_DIR``
serves a local model directory instead). A model that cannot be found, downloaded or run stops the
start-up with one clear error; the server never comes up half-working.

Endpoints:

- ``POST /predict`` ``{"texts": ["...", ...]}`` -> ``[{"request_id", "label", "confidence",
  "probabilities", "model_version"}, ...]``, one result per text, in order.
- ``POST /feedback`` ``{"request_id": "...", "label": "..."}``: the true label of an earlier
  prediction, served by this replica or any other (404 for an id no replica logged, with
  ``Retry-After`` while it may still wait in a replica's buffer; 422 for a label the model does not
  know; 503 with ``Retry-After`` while the prediction log's store does not answer).
- ``GET /livez``, ``/readyz`` (200 only once the model is loaded), ``/metrics`` (Prometheus: BentoML's
  request metrics, ``tuneloop_predictions_total{label, model_version}``, feedback and log counters).

The logic lives in :mod:`tuneloop.serving`; this file only declares the service.
"""

from __future__ import annotations

import os

import anyio.to_thread
import bentoml
from starlette.responses import JSONResponse

from tuneloop.errors import TuneloopError
from tuneloop.serving import (
    FeedbackError,
    FeedbackRequest,
    FeedbackResponse,
    Prediction,
    PredictRequest,
    RequestGuard,
    RequestPolicy,
    ServingRuntime,
    stop_server_on_startup_error,
)

MAX_BATCH_SIZE = int(os.environ.get("TUNELOOP_MAX_BATCH_SIZE", "64"))
"""Most texts in one adaptive batch (a request with more texts is split across batches)."""
MAX_LATENCY_MS = int(os.environ.get("TUNELOOP_MAX_LATENCY_MS", "20000"))
"""Queueing budget of the adaptive batcher: a request whose estimated wait exceeds it gets a 503. Set
well above the time of a full batch on a small CPU so that bursts queue instead of being shed."""


@bentoml.service(name="tuneloop", workers=1, traffic={"timeout": 120})
class TuneloopService:
    """Text classification with the registry's champion (or a pinned version)."""

    def __init__(self) -> None:
        try:
            self.runtime = ServingRuntime.from_environment()
        except TuneloopError as error:
            stop_server_on_startup_error(error)
            raise

    @bentoml.api(
        route="/predict",
        input_spec=PredictRequest,
        batchable=True,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def predict(self, texts: list[str]) -> list[Prediction]:
        """Classify texts: one result (label, probabilities, model version, request id) per text."""
        return self.runtime.predict(texts)

    # The response is always JSON: saves BentoML building the output's JSON schema on every response.
    predict.output_spec.media_type = "application/json"

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    async def feedback(self, request_id: str, label: str) -> FeedbackResponse:
        """Record the true label of an earlier prediction, named by its request id."""
        try:
            return await anyio.to_thread.run_sync(self.runtime.record_feedback, request_id, label)
        except FeedbackError as error:
            return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        """Flush the prediction log before the process exits."""
        self.runtime.close()


def current_policy() -> RequestPolicy | None:
    """The running service's request policy (None until the service is initialised)."""
    try:
        instance = bentoml.get_current_service()
    except Exception:  # BentoMLException: no service instance yet
        return None
    runtime = getattr(instance, "runtime", None)
    return runtime.policy if runtime is not None else None


TuneloopService.add_asgi_middleware(RequestGuard, policy=current_policy)
