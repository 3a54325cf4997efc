"""Windows of the prediction log (``24h``, ``5000``) and the text statistics of a window's records."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import pandas as pd

from tuneloop.errors import ConfigError
from tuneloop.features import STATISTIC_COLUMNS, text_statistics
from tuneloop.monitoring.common import _UNITS, STAGE

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


def with_statistics(frame: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """``frame`` with every text-statistics column; missing ones computed from ``text_column``."""
    missing = [name for name in STATISTIC_COLUMNS if name not in frame.columns]
    frame = frame.copy()
    if missing:
        statistics = text_statistics(frame[text_column])
        for name in missing:
            frame[name] = statistics[name].to_numpy()
    return frame.astype({name: dtype for name, dtype in STATISTIC_COLUMNS.items()})
