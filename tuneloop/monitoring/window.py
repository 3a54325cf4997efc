"""Windows of the prediction log (``24h``, ``5000``) and the text statistics of a window's records."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import pandas as pd
from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError
from tuneloop.features import STATISTIC_COLUMNS, text_statistics
from tuneloop.monitoring.common import _UNITS, LOG_COLUMNS, STAGE
from tuneloop.prediction_log import (
    MODEL_VERSION,
    PREDICTIONS,
    TIMESTAMP,
    check_store,
    prediction_log_uri,
    read_log,
)

# --------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    """A window of the prediction log: the last ``duration`` of time, or the last ``records``."""

    spec: str
    duration: dt.timedelta | None = None
    records: int | None = None

    def describe(self) -> str:
        return f"last {self.records} records" if self.records else f"last {self.spec}"


def parse_window(spec: str | int) -> Window:
    """``24h``, ``90m``, ``7d``, ``2w``, ``3600s`` (a duration) or ``5000`` (a record count).

    Raises:
        ConfigError: anything else, or zero.
    """
    text = str(spec).strip().lower()
    match = re.fullmatch(r"([0-9]+)\s*([smhdw]?)", text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(
            f"invalid window {spec!r}: use a duration like 24h, 90m, 7d or a number of records like 5000",
            stage=STAGE, field="monitoring.window",
        )
    number, unit = int(match.group(1)), match.group(2)
    if not unit:
        return Window(spec=text, records=number)
    return Window(spec=text, duration=dt.timedelta(**{_UNITS[unit]: number}))


# --------------------------------------------------------------------------------------------
# Reading the log


@dataclass
class CurrentData:
    """The monitored version's records in the window, and what was left out."""

    frame: pd.DataFrame
    window: Window
    start: pd.Timestamp | None
    end: pd.Timestamp
    log_uri: str
    files_read: list[str]
    files_skipped: list[dict]
    other_versions: dict[str, int]
    rows_in_window: int


def load_current(config: TuneloopConfig, window: Window, version: str | None, *, now: pd.Timestamp) -> CurrentData:
    """The prediction-log records of ``version`` in ``window`` (oldest first).

    Raises:
        ConfigError: a pod-local log in a cluster, or a bucket that does not exist.
        ServiceUnavailableError: the log's store does not answer.
    """
    uri = prediction_log_uri(config)
    check_store(uri)
    start = now - pd.Timedelta(window.duration) if window.duration else None
    read = read_log(uri, PREDICTIONS, start=start, end=now, last=window.records,
                    columns=[*LOG_COLUMNS, *STATISTIC_COLUMNS], required=LOG_COLUMNS,
                    version=None if version is None else str(version))
    frame = read.frame
    rows_in_window = len(frame) + sum(read.other_versions.values())
    if not frame.empty:
        frame = frame.copy()
        frame[MODEL_VERSION] = frame[MODEL_VERSION].astype(str)
        frame = frame[frame[TIMESTAMP].notna()].sort_values(TIMESTAMP, kind="stable")
        if window.records:
            frame = frame.tail(window.records)
    return CurrentData(
        frame=frame.reset_index(drop=True), window=window, start=start, end=now, log_uri=uri,
        files_read=read.files_read, files_skipped=read.files_skipped, other_versions=read.other_versions,
        rows_in_window=rows_in_window,
    )


def with_statistics(frame: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """``frame`` with every text-statistics column; missing ones computed from ``text_column``."""
    missing = [name for name in STATISTIC_COLUMNS if name not in frame.columns]
    frame = frame.copy()
    if missing:
        statistics = text_statistics(frame[text_column])
        for name in missing:
            frame[name] = statistics[name].to_numpy()
    return frame.astype({name: dtype for name, dtype in STATISTIC_COLUMNS.items()})
