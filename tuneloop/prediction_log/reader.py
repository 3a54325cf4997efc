"""Reading the prediction log: windows through ``pyarrow.dataset`` with partition pruning, and the
bounded lookup of one request id."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from tuneloop.errors import TuneloopError
from tuneloop.prediction_log.layout import (
    DATE,
    HOUR,
    MODEL_VERSION,
    PARTITION_TIME,
    PREDICTED_LABEL,
    PREDICTIONS,
    FEEDBACK,
    REQUEST_ID,
    STAGE,
    TIMESTAMP,
    _display,
    _may_hold,
    _utc,
    filesystem,
    partition_of,
    partition_path,
    request_id_time,
    unreachable,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("tuneloop.prediction_log")

READ_THREADS = 8
"""Files of one hour partition read at once."""


@dataclass
class LogRead:
    """Records read from the log, what was skipped, and what the version filter left out."""

    frame: "pd.DataFrame"
    files_read: list[str] = field(default_factory=list)
    files_skipped: list[dict] = field(default_factory=list)
    other_versions: dict[str, int] = field(default_factory=dict)


def _partition_schema():
    import pyarrow as pa

    return pa.schema([pa.field(DATE, pa.string()), pa.field(HOUR, pa.int32())])


def _list(fs, path: str, uri: str, *, recursive: bool) -> list[str]:
    """Entries under ``path`` ([] when it does not exist), never from a stale listing cache."""
    fs.invalidate_cache(path)
    try:
        return fs.find(path) if recursive else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as error:  # an outage is an error to retry, never "no data"
        raise unreachable(uri, error, f"listing {_display(fs, path)}") from error


def _log_files(paths: Iterable[str]) -> list[str]:
    return sorted(p for p in paths if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))


def _dates(fs, root: str, kind: str, uri: str) -> list[str]:
    """The ``date=`` partitions of ``kind``, oldest first."""
    prefix = f"{DATE}="
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in _list(fs, f"{root}/{kind}", uri, recursive=False))
    return sorted(name[len(prefix):] for name in names if name.startswith(prefix))


def _partition_filter(start: dt.datetime | None, end: dt.datetime | None):
    """A pyarrow expression on ``date``/``hour`` keeping the partitions that overlap ``start..end``."""
    import pyarrow.dataset as ds

    date, hour = ds.field(DATE), ds.field(HOUR)
    expression = None
    if start is not None:
        day, first = partition_of(start)
        expression = (date > day) | ((date == day) & (hour >= first))
    if end is not None:
        day, last = partition_of(end)
        upper = (date < day) | ((date == day) & (hour <= last))
        expression = upper if expression is None else expression & upper
    return expression


def _fragments(fs, root: str, kind: str, files: list[str], partitions=None) -> list:
    """The files as pyarrow dataset fragments (hive ``date``/``hour`` keys), pruned by ``partitions``.

    The dataset is given its schema, so no file is opened here: a corrupt one fails only its own read.
    """
    import pyarrow.dataset as ds

    if not files:
        return []
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=_partition_schema(),
                         partitioning=ds.partitioning(_partition_schema(), flavor="hive"),
                         partition_base_dir=f"{root}/{kind}")
    return list(dataset.get_fragments(filter=partitions) if partitions is not None else dataset.get_fragments())


def _hour_key(fragment) -> tuple[str, int]:
    import pyarrow.dataset as ds

    keys = ds.get_partition_keys(fragment.partition_expression)
    return str(keys.get(DATE, "")), int(keys.get(HOUR, -1))


def read_log(
    uri: str,
    kind: str = PREDICTIONS,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    last: int | None = None,
    columns: Sequence[str] | None = None,
    required: Sequence[str] = (),
    version: str | None = None,
) -> LogRead:
    """Read the records of ``kind`` served between ``start`` and ``end`` (UTC, both optional).

    Only the partitions of that time range are listed and opened, and only ``columns`` (those present
    among them; all when None) are read. A file that cannot be read, or lacks a ``required`` column,
    is skipped and named in :attr:`LogRead.files_skipped`; it never fails the read.

    Args:
        last: read partitions newest first and stop once at least this many records (of ``version``)
            were read; the caller keeps the newest ``last`` of them.
        version: keep only records of this ``model_version``; the others are counted per version in
            :attr:`LogRead.other_versions`.

    Raises:
        ServiceUnavailableError: the store does not answer (an outage is never "no data").
    """
    import pandas as pd

    fs, root = filesystem(uri)
    root = root.rstrip("/")
    time_column = PARTITION_TIME[kind]
    if start is not None or end is not None:
        required = tuple(dict.fromkeys([*required, time_column]))
    wanted = None if columns is None else list(dict.fromkeys([*columns, *required, time_column]))
    if version is not None and wanted is not None and MODEL_VERSION not in wanted:
        wanted.append(MODEL_VERSION)
    rows_filter = _time_filter(time_column, start, end)
    partitions = _partition_filter(start, end)
    dates = _window_dates(fs, root, kind, uri, start, end)
    result = LogRead(frame=pd.DataFrame(columns=wanted or list(required)))
    frames: list[pd.DataFrame] = []
    counted: Counter = Counter()
    for fragments in _hours(fs, root, kind, uri, dates, partitions, newest_first=bool(last)):
        for path, table, reason in _read_fragments(fs, fragments, wanted, required, rows_filter):
            if table is None:
                result.files_skipped.append({"path": path, "reason": reason})
                continue
            result.files_read.append(path)
            frame = table.to_pandas()
            if version is not None:
                versions = frame[MODEL_VERSION].astype(str)
                counted.update(versions[versions != str(version)].tolist())
                frame = frame[versions == str(version)]
            frames.append(frame)
        if last and sum(len(frame) for frame in frames) >= last:
            break
    result.other_versions = {str(k): int(v) for k, v in sorted(counted.items())}
    if frames:
        result.frame = pd.concat(frames, ignore_index=True)
        if time_column in result.frame.columns:
            result.frame[time_column] = pd.to_datetime(result.frame[time_column], utc=True)
    return result


def list_files(uri: str, kind: str = PREDICTIONS, *, start: dt.datetime | None = None,
               end: dt.datetime | None = None) -> list[str]:
    """The log's files of ``kind`` (paths on :func:`filesystem`) in the partitions overlapping
    ``start..end`` (every partition when both are None), oldest partition first.

    Raises:
        ServiceUnavailableError: the store does not answer.
    """
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    dates = _window_dates(fs, root, kind, uri, start, end)
    partitions = _partition_filter(start, end)
    return [fragment.path for hour in _hours(fs, root, kind, uri, dates, partitions, newest_first=False)
            for fragment in hour]


def _window_dates(fs, root: str, kind: str, uri: str, start: dt.datetime | None, end: dt.datetime | None):
    return [d for d in _dates(fs, root, kind, uri)
            if (start is None or d >= partition_of(start)[0]) and (end is None or d <= partition_of(end)[0])]


def _hours(fs, root: str, kind: str, uri: str, dates: list[str], partitions, *, newest_first: bool):
    """The fragments of each hour partition kept by ``partitions``, one list per hour, in time order."""
    for date in (reversed(dates) if newest_first else dates):
        files = _log_files(_list(fs, f"{root}/{kind}/{DATE}={date}", uri, recursive=True))
        hours: dict[tuple[str, int], list] = {}
        for fragment in _fragments(fs, root, kind, files, partitions):
            hours.setdefault(_hour_key(fragment), []).append(fragment)
        for key in sorted(hours, reverse=newest_first):
            yield hours[key]


def _time_filter(column: str, start: dt.datetime | None, end: dt.datetime | None):
    import pyarrow as pa
    import pyarrow.dataset as ds

    expression = None
    if start is not None:
        expression = ds.field(column) >= pa.scalar(_utc(start), pa.timestamp("us", "UTC"))
    if end is not None:
        upper = ds.field(column) <= pa.scalar(_utc(end), pa.timestamp("us", "UTC"))
        expression = upper if expression is None else expression & upper
    return expression


def _read_fragments(fs, fragments: list, wanted, required, rows_filter) -> list[tuple[str, Any, str | None]]:
    """``(path, table, None)`` or ``(path, None, why it was skipped)`` per file, read concurrently
    (an object store answers many small reads at once far faster than one after another)."""
    def read(fragment):
        return _read_fragment(fs, fragment, wanted, required, rows_filter)

    if len(fragments) <= 1:
        return [read(fragment) for fragment in fragments]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(fragments))) as pool:
        return list(pool.map(read, fragments))


def _read_fragment(fs, fragment, wanted, required, rows_filter) -> tuple[str, Any, str | None]:
    """One file's table with the ``wanted`` columns it has and the rows ``rows_filter`` keeps."""
    path = _display(fs, fragment.path)
    try:
        names = set(fragment.physical_schema.names)
        missing = [column for column in required if column not in names]
        if missing:
            return path, None, f"missing columns {', '.join(missing)}"
        columns = None if wanted is None else [column for column in wanted if column in names]
        return path, fragment.to_table(columns=columns, filter=rows_filter), None
    except Exception as error:  # pyarrow raises several types for a corrupt or truncated file
        _raise_if_store_down(fs, fragment.path, path, error)
        return path, None, f"{type(error).__name__}: {error}".strip().splitlines()[0]


def _raise_if_store_down(fs, path: str, shown: str, error: BaseException) -> None:
    """After a failed read, ask the store about the file: if it does not answer, the read failed
    because of an outage (raise it), not because the file is bad (the caller skips it)."""
    try:
        fs.invalidate_cache(path)
        fs.info(path)
    except FileNotFoundError:
        return
    except Exception as probe:  # the store's client raises its own types
        raise unreachable(shown, probe, f"reading {shown}") from error


def read_predictions(uri: str, **options: Any) -> "pd.DataFrame":
    """Every flushed prediction record (or those of a window, see :func:`read_log`) as a DataFrame."""
    return read_log(uri, PREDICTIONS, **options).frame


def read_feedback(uri: str, **options: Any) -> "pd.DataFrame":
    """Every flushed feedback record (or those of predictions served in a window) as a DataFrame."""
    return read_log(uri, FEEDBACK, **options).frame


# --------------------------------------------------------------------------------------------
# Finding a prediction by its request id


class PredictionNotFound(TuneloopError):
    """No logged prediction has this request id; ``retry_after`` (seconds) when it may still be
    waiting in a replica's buffer."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message, stage=STAGE, field=REQUEST_ID)
        self.retry_after = retry_after


LOOKUP_COLUMNS = (REQUEST_ID, TIMESTAMP, MODEL_VERSION, PREDICTED_LABEL)


def find_prediction(uri: str, request_id: str) -> dict[str, Any] | None:
    """The logged prediction with this id (``request_id, timestamp, model_version, predicted_label``),
    or None. Bounded: one listing of the id's hour, then only the files whose name range holds the
    id's time, read with a filter on ``request_id``. Unreadable files are skipped and logged.

    Raises:
        ServiceUnavailableError: the store does not answer.
    """
    import pyarrow.dataset as ds

    served = request_id_time(request_id)
    if served is None:
        return None
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    hour = partition_path(root, PREDICTIONS, *partition_of(served))
    files = [p for p in _log_files(_list(fs, hour, uri, recursive=False)) if _may_hold(p.rsplit("/", 1)[-1], served)]
    for fragment in _fragments(fs, root, PREDICTIONS, files):
        path, table, reason = _read_fragment(fs, fragment, list(LOOKUP_COLUMNS), LOOKUP_COLUMNS,
                                             ds.field(REQUEST_ID) == request_id)
        if table is None:
            logger.warning("prediction log: skipped unreadable file %s: %s", path, reason)
        elif table.num_rows:
            return table.slice(0, 1).to_pylist()[0]
    return None
