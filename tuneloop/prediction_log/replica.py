"""One serving process's prediction log (:class:`PredictionLog`): two writers, recent ids, lookups."""

from __future__ import annotations

import datetime as dt
import functools
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tuneloop.prediction_log import reader
from tuneloop.prediction_log.layout import (
    CLOCK_SKEW_S,
    FEEDBACK,
    FLUSH_GRACE_S,
    LABEL,
    MODEL_VERSION,
    PREDICTED_LABEL,
    PREDICTIONS,
    RECENT_IDS,
    REQUEST_ID,
    REQUEST_ID_FORMAT,
    SERVED_AT,
    TEXT,
    TIMESTAMP,
    _utc,
    check_store,
    new_writer_id,
    prediction_log_uri,
    request_id_time,
    safe_uri,
    with_text_features,
)
from tuneloop.prediction_log.reader import LOOKUP_COLUMNS, PredictionNotFound
from tuneloop.prediction_log.writer import LogWriter

if TYPE_CHECKING:
    from tuneloop.config import TuneloopConfig


def _with_private_text(policy: Callable[[str], str | None], records: list[dict[str, Any]]):
    """The log's frame with the text as ``privacy.prediction_log`` stores it (:mod:`tuneloop.privacy`);
    the text statistics are computed from the served text first, so drift monitoring still sees them."""
    import pandas as pd

    frame = with_text_features(records)
    frame[TEXT] = pd.Series([policy(str(text)) for text in frame[TEXT]], dtype="string")
    return frame


class PredictionLog:
    """The prediction log of one serving process: its two writers, its recent ids, and lookups.

    Args:
        uri: the log URI; checked at once (:func:`check_store`).
        on_drop: called with the number of records dropped.
        text_policy: what is written of each served text (:func:`tuneloop.privacy.log_text_policy`: masked,
            pseudonymised or None), applied after the text statistics; None writes texts as served.

    Raises:
        ServiceUnavailableError: the object store does not answer at start.
        ConfigError: its bucket does not exist, or the local folder cannot be made.
    """

    def __init__(self, uri: str, *, flush_records: int = 1000, flush_seconds: float = 5.0,
                 max_buffered: int = 100_000, on_drop: Callable[[int], None] | None = None,
                 writer_id: str | None = None, text_policy: Callable[[str], str | None] | None = None) -> None:
        check_store(uri)
        self.uri = uri
        self.writer_id = writer_id or new_writer_id()
        self.flush_seconds = float(flush_seconds)
        options = dict(writer_id=self.writer_id, flush_records=flush_records, flush_seconds=flush_seconds,
                       max_buffered=max_buffered, on_drop=on_drop)
        transform = with_text_features if text_policy is None else functools.partial(_with_private_text, text_policy)
        self.predictions = LogWriter(uri, PREDICTIONS, transform=transform, **options)
        self.feedback = LogWriter(uri, FEEDBACK, **options)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: "TuneloopConfig", *, on_drop: Callable[[int], None] | None = None,
                    environ: Mapping[str, str] | None = None) -> "PredictionLog":
        """The log of ``deployment``: its URI and flush settings."""
        from tuneloop.privacy import log_text_policy

        deployment = config.deployment
        return cls(prediction_log_uri(config, environ), flush_records=deployment.log_flush_records,
                   flush_seconds=deployment.log_flush_seconds, max_buffered=deployment.log_max_buffered,
                   on_drop=on_drop, text_policy=log_text_policy(config.privacy, environ))

    @property
    def alive(self) -> bool:
        return self.predictions.alive and self.feedback.alive

    def log_predictions(self, records: list[dict[str, Any]]) -> bool:
        """Queue prediction records (each with a :func:`new_request_id` id) and remember their ids."""
        with self._recent_lock:
            for record in records:
                self._recent[record[REQUEST_ID]] = {key: record[key] for key in LOOKUP_COLUMNS}
            while len(self._recent) > RECENT_IDS:
                self._recent.popitem(last=False)
        return self.predictions.write(records)

    def find(self, request_id: str, *, now: dt.datetime | None = None) -> dict[str, Any]:
        """The prediction with this id, from this process's memory or the shared log.

        Raises:
            PredictionNotFound: no such prediction (yet: ``retry_after`` is set when the id is recent
                enough to be waiting in another replica's buffer).
            ServiceUnavailableError: the store does not answer.
        """
        with self._recent_lock:
            known = self._recent.get(request_id)
        if known is not None:
            return known
        served = request_id_time(request_id)
        if served is None:
            raise PredictionNotFound(f"no prediction with request_id {request_id!r}: not an id this service "
                                     f"issues (format {REQUEST_ID_FORMAT})")
        found = reader.find_prediction(self.uri, request_id)
        if found is not None:
            return found
        age = ((now or dt.datetime.now(dt.timezone.utc)) - served).total_seconds()
        if -CLOCK_SKEW_S <= age <= self.flush_seconds + FLUSH_GRACE_S:
            wait = max(1, math.ceil(self.flush_seconds))
            raise PredictionNotFound(
                f"no prediction with request_id {request_id!r} in the prediction log (yet): it was served "
                f"{max(age, 0):.0f}s ago and replicas write their log every {self.flush_seconds:g}s; retry in "
                f"{wait}s", retry_after=wait)
        raise PredictionNotFound(f"no prediction with request_id {request_id!r}: unknown, or not in the prediction "
                                 f"log at {safe_uri(self.uri)}")

    def log_feedback(self, prediction: Mapping[str, Any], label: str, *, now: dt.datetime | None = None) -> None:
        """Queue the true label of a prediction found by :meth:`find`."""
        served = request_id_time(str(prediction[REQUEST_ID])) or _utc(prediction[TIMESTAMP])
        self.feedback.write([{REQUEST_ID: prediction[REQUEST_ID], TIMESTAMP: now or dt.datetime.now(dt.timezone.utc),
                              SERVED_AT: served, LABEL: label, MODEL_VERSION: str(prediction[MODEL_VERSION]),
                              PREDICTED_LABEL: str(prediction[PREDICTED_LABEL])}])

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything queued now; True when all of it was written."""
        return self.predictions.flush(timeout) and self.feedback.flush(timeout)

    def close(self) -> None:
        """Flush and stop both writers (idempotent)."""
        self.predictions.close()
        self.feedback.close()

    @property
    def written(self) -> int:
        return self.predictions.written + self.feedback.written

    @property
    def dropped(self) -> int:
        return self.predictions.dropped + self.feedback.dropped
