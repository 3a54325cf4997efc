"""Names every part of the drift monitor shares: columns, verdicts, exit codes, the error type, and
small helpers for JSON and messages."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from tuneloop.errors import DataError
from tuneloop.features import STATISTIC_COLUMNS
from tuneloop.prediction_log import (
    MODEL_VERSION,
    REQUEST_ID,
    TEXT,
    TIMESTAMP,
)
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
)

STAGE = "monitoring"

LOG_COLUMNS = (REQUEST_ID, TIMESTAMP, MODEL_VERSION, TEXT, PREDICTION)
"""Prediction-log columns the drift check needs (the text statistics are read when present)."""

CATEGORICAL_STATISTICS = ("has_url", "has_phone_number")
NUMERICAL_STATISTICS = tuple(name for name in STATISTIC_COLUMNS if name not in CATEGORICAL_STATISTICS)
DESCRIPTOR_COLUMNS = ("non_letter_share", "sentence_count")

DRIFT, NO_DRIFT, INSUFFICIENT_DATA = "drift", "no_drift", "insufficient_data"
VERDICT_LINES = {
    NO_DRIFT: "verdict: no drift",
    DRIFT: "verdict: drift detected",
    INSUFFICIENT_DATA: "verdict: insufficient data",
}
EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_INSUFFICIENT_DATA, EXIT_ALERT_SPOOLED = 0, 10, 11, 12
EXIT_CODES = {NO_DRIFT: EXIT_NO_DRIFT, DRIFT: EXIT_DRIFT, INSUFFICIENT_DATA: EXIT_INSUFFICIENT_DATA}
ALERT_KIND = "drift_detected"
TEXT_METHOD = "abs_text_content_drift"
ALERT_COLUMNS = 6
"""Drifted columns named in an alert's message (the details list them all)."""
REFERENCE_SEED = 0
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class MonitoringError(DataError):
    """The drift check cannot run on what it was given (a reference without texts, ...)."""


def _describe(column: dict) -> str:
    return f"{column['column']} ({column['method']} {column['score']:.3g}, threshold {column['threshold']:.3g})"


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.isoformat()
    return value


def _iso(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else pd.Timestamp(value).isoformat()


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]
