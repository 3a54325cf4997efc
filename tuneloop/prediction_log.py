"""The prediction log: its format, its writer and its readers, in one place.

Serving writes it, the drift monitor and ``/feedback`` read it; nothing else knows its layout.

**Layout.** A Hive-partitioned Parquet dataset under ``deployment.prediction_log_uri`` (any fsspec
URI: ``s3://bucket/prefix`` in a cluster, shared by every replica and the monitor; the local default is
``<state_dir>/predictions``)::

    <uri>/predictions/date=YYYY-MM-DD/hour=HH/<writer id>-<seq>-<first>-<last>.parquet
    <uri>/feedback/date=YYYY-MM-DD/hour=HH/<writer id>-<seq>-<first>-<last>.parquet

Each serving process is one *writer* (:func:`new_writer_id`: the pod name ``$HOSTNAME`` plus a random
suffix, so two processes never share a file name) and writes one file per partition per flush;
``seq`` counts its files; ``first`` and ``last`` (``HHMMSSmmm``, UTC) bound the serving times of the
records inside, an index that lets a feedback lookup open only the file that can hold an id. A file
appears whole or not at all: on an object store with one PUT, on a local disk through a temporary file
and ``os.replace``. The partition of a record is the UTC hour it was *served*: ``timestamp`` for a
prediction, ``served_at`` for a feedback label (so a window's feedback lies in the window's partitions).

**Records.** Prediction: ``request_id, timestamp (UTC), model_version, text, <text statistics of
tuneloop.features>, predicted_label, confidence, probability_<label>...``. Feedback: ``request_id,
timestamp (when received, UTC), served_at (UTC), label, model_version, predicted_label``.

**Request ids** carry their serving time: ``YYYYMMDDTHHMMSSmmmZ-<20 hex digits>`` (UTC to the
millisecond, then 80 random bits), e.g. ``20261201T131502123Z-9f86d081884c7d659a2f``. They sort by
time, and any replica finds the partition of an id from the id alone (:func:`find_prediction`): one
listing of that hour, then only the files whose ``first..last`` range holds the id's time, read with
a pyarrow filter on ``request_id`` (row-group statistics skip the rest).

**Durability.** :class:`LogWriter` buffers records off the request path and writes every
``flush_records`` records or ``flush_seconds`` seconds, and on close. A write that fails (store
unreachable) keeps its records and retries on the next flush under the same file name (a retry after
a write that did land overwrites it, never duplicates); at most ``max_buffered`` records wait, beyond
that new ones are dropped and counted. Close retries until ``close_timeout`` before giving up.
"""

from __future__ import annotations

import atexit
import datetime as dt
import itertools
import logging
import math
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from tuneloop.errors import ConfigError, ServiceUnavailableError, TuneloopError
from tuneloop.world import is_object_store_uri

if TYPE_CHECKING:
    import pandas as pd

    from tuneloop.config import TuneloopConfig

logger = logging.getLogger("tuneloop.prediction_log")

STAGE = "prediction-log"
LOG_URI_ENV = "TUNELOOP_PREDICTION_LOG_DIR"
"""Overrides ``deployment.prediction_log_uri`` (any fsspec URI)."""
SERVICE = "object store"

PREDICTIONS, FEEDBACK = "predictions", "feedback"
"""The two datasets under the log URI."""
KINDS = (PREDICTIONS, FEEDBACK)

# Columns
REQUEST_ID = "request_id"
TIMESTAMP = "timestamp"
SERVED_AT = "served_at"
MODEL_VERSION = "model_version"
TEXT = "text"
PREDICTED_LABEL = "predicted_label"
CONFIDENCE = "confidence"
PROBABILITY_PREFIX = "probability_"
LABEL = "label"
"""The true label of a feedback record."""
PARTITION_TIME = {PREDICTIONS: TIMESTAMP, FEEDBACK: SERVED_AT}
"""The column whose UTC hour names a record's partition."""
DATE, HOUR = "date", "hour"

REQUEST_ID_FORMAT = "YYYYMMDDTHHMMSSmmmZ-<20 hex digits>"
_REQUEST_ID = re.compile(r"(\d{8}T\d{9})Z-[0-9a-f]{20}")
_NAME_RANGE = re.compile(r"-(\d{9})-(\d{9})\.parquet$")
RECENT_IDS = 100_000
"""Request ids a replica remembers in memory (its own predictions, flushed or not)."""
FLUSH_GRACE_S = 30.0
"""How long after its serving time a missing id may still be waiting in another replica's buffer."""
CLOCK_SKEW_S = 300.0


# --------------------------------------------------------------------------------------------
# Names: URIs, partitions, request ids, files


def prediction_log_uri(config: "TuneloopConfig", environ: Mapping[str, str] | None = None) -> str:
    """The log URI: ``$TUNELOOP_PREDICTION_LOG_DIR``, else ``deployment.prediction_log_uri``, else
    ``<state_dir>/predictions`` (a relative local path is taken against the working directory)."""
    environ = os.environ if environ is None else environ
    uri = (environ.get(LOG_URI_ENV) or "").strip() or config.deployment.prediction_log_uri \
        or str(Path(config.state_dir) / "predictions")
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    return uri.rstrip("/")


def safe_uri(uri: str) -> str:
    """``uri`` without a user name or password, for messages."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://***@{parts.hostname or ''}{port}{parts.path}"


def partition_of(when: dt.datetime) -> tuple[str, int]:
    """``(date, hour)`` of a UTC time: the partition its records go to."""
    when = _utc(when)
    return f"{when:%Y-%m-%d}", when.hour


def partition_path(root: str, kind: str, date: str, hour: int) -> str:
    """``<root>/<kind>/date=<date>/hour=<HH>``."""
    return f"{root.rstrip('/')}/{kind}/{DATE}={date}/{HOUR}={hour:02d}"


def new_request_id(when: dt.datetime) -> str:
    """A request id served at ``when`` (see the module docstring for the format)."""
    when = _utc(when)
    return f"{when:%Y%m%dT%H%M%S}{when.microsecond // 1000:03d}Z-{secrets.token_hex(10)}"


def request_id_time(request_id: str) -> dt.datetime | None:
    """The serving time encoded in a request id (UTC, to the millisecond); None for a malformed id."""
    match = _REQUEST_ID.fullmatch(request_id or "")
    if not match:
        return None
    try:
        return dt.datetime.strptime(match.group(1) + "000", "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def new_writer_id(environ: Mapping[str, str] | None = None) -> str:
    """``<pod name>-<6 random hex>``: ``$HOSTNAME`` (the pod name in Kubernetes) or the host name,
    with characters other than letters, digits, ``.``, ``_`` and ``-`` turned into ``_``."""
    environ = os.environ if environ is None else environ
    host = (environ.get("HOSTNAME") or socket.gethostname() or "writer").strip()
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', host)[:60]}-{secrets.token_hex(3)}"


def file_name(writer_id: str, seq: int, first: dt.datetime, last: dt.datetime) -> str:
    """``<writer id>-<seq>-<first HHMMSSmmm>-<last HHMMSSmmm>.parquet``."""
    return f"{writer_id}-{seq:06d}-{_clock(first)}-{_clock(last)}.parquet"


def _clock(when: dt.datetime) -> str:
    when = _utc(when)
    return f"{when:%H%M%S}{when.microsecond // 1000:03d}"


def _may_hold(name: str, when: dt.datetime) -> bool:
    """Whether a log file of ``when``'s hour can hold a record served at ``when`` (its name's range)."""
    match = _NAME_RANGE.search(name)
    return match is None or match.group(1) <= _clock(when) <= match.group(2)


def _utc(when: Any) -> dt.datetime:
    if hasattr(when, "to_pydatetime"):
        when = when.to_pydatetime()
    if not isinstance(when, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(when).__name__}")
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


# --------------------------------------------------------------------------------------------
# The store


def filesystem(uri: str):
    """The fsspec file system of ``uri`` and the root path on it."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _display(fs, path: str) -> str:
    """A path as a user would name it: a local path, or the full URI."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def unreachable(uri: str, error: BaseException, doing: str) -> ServiceUnavailableError:
    """The outage error of the store holding the log at ``uri`` (one line, no credentials)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ServiceUnavailableError(
        f"{SERVICE} unreachable at {safe_uri(uri)} while {doing}: {type(error).__name__}: {reason}",
        service=SERVICE, uri=safe_uri(uri), stage=STAGE,
    )


def check_store(uri: str) -> None:
    """Prove the log's store answers (a local folder is created).

    Raises:
        ServiceUnavailableError: the object store does not answer.
        ConfigError: its bucket does not exist, or the local folder cannot be made.
    """
    try:
        fs, root = filesystem(uri)
    except Exception as error:  # an unknown protocol or a missing fsspec backend
        raise ConfigError(f"deployment.prediction_log_uri: cannot open {safe_uri(uri)}: {error}", stage=STAGE,
                          field="deployment.prediction_log_uri") from error
    if _is_local(fs):
        try:
            fs.makedirs(root, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the prediction log folder {uri}: {error}", stage=STAGE, path=uri,
                              field="deployment.prediction_log_uri") from error
        return
    if not is_object_store_uri(uri):
        return  # memory:// and friends: nothing to reach
    bucket = root.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError as error:
        raise ConfigError(f"deployment.prediction_log_uri: the {SERVICE} bucket {bucket!r} of {safe_uri(uri)} "
                          f"does not exist; create it first", stage=STAGE,
                          field="deployment.prediction_log_uri") from error
    except Exception as error:  # botocore and friends raise their own types for a refused connection
        raise unreachable(uri, error, "checking it at start") from error


def write_table_atomically(fs, path: str, table) -> None:
    """Write a Parquet file that readers see whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    if not _is_local(fs):
        fs.pipe_file(path, data)  # one PUT: an object store publishes it complete or not at all
        return
    directory, name = path.rsplit("/", 1)
    os.makedirs(directory, exist_ok=True)
    temporary = f"{directory}/.{name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def append(uri: str, records: "pd.DataFrame | Sequence[Mapping[str, Any]]", kind: str = PREDICTIONS, *,
           writer_id: str | None = None) -> list[str]:
    """Write records to the log now, one file per partition (tests, benchmarks, back-fills).

    Returns:
        the paths written.
    """
    import pandas as pd

    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame.from_records(list(records))
    if frame.empty:
        return []
    fs, root = filesystem(uri)
    writer_id = writer_id or new_writer_id()
    times = pd.to_datetime(frame[PARTITION_TIME[kind]], utc=True)
    paths = []
    for seq, ((date, hour), rows) in enumerate(frame.groupby([times.dt.strftime("%Y-%m-%d"), times.dt.hour])):
        chunk_times = times.loc[rows.index]
        path = f"{partition_path(root, kind, date, int(hour))}/" \
               f"{file_name(writer_id, seq, chunk_times.min(), chunk_times.max())}"
        write_table_atomically(fs, path, _table(rows.reset_index(drop=True)))
        paths.append(path)
    return paths


def _table(frame: "pd.DataFrame"):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


# --------------------------------------------------------------------------------------------
# The writer


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class _Stop(_Flush):
    pass


@dataclass
class _Chunk:
    """Records of one partition cut from the buffer, with the file name they will always be written to."""

    path: str
    records: list[dict[str, Any]]
    table: Any = None


class LogWriter:
    """Append records of one kind to the log, buffered off the caller's thread.

    :meth:`write` only queues records; a daemon thread collects them and writes one file per
    partition every ``flush_records`` records or ``flush_seconds`` seconds (whichever comes first), on
    :meth:`flush`, and on :meth:`close` (also registered with ``atexit``).

    Args:
        uri: the log URI (the ``predictions``/``feedback`` folders are below it).
        kind: :data:`PREDICTIONS` or :data:`FEEDBACK`.
        writer_id: this process's writer id (default :func:`new_writer_id`).
        transform: turns buffered records into the DataFrame to write (in the writer thread).
        on_drop: called with the number of records dropped (the buffer was full, or the writer closed).
        close_timeout: how long :meth:`close` keeps retrying an unreachable store.
    """

    def __init__(
        self,
        uri: str,
        kind: str = PREDICTIONS,
        *,
        writer_id: str | None = None,
        flush_records: int = 1000,
        flush_seconds: float = 5.0,
        max_buffered: int = 100_000,
        transform: Callable[[list[dict[str, Any]]], "pd.DataFrame"] | None = None,
        on_drop: Callable[[int], None] | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown log kind {kind!r}; expected one of {KINDS}")
        self.uri = uri
        self.kind = kind
        self.fs, self.root = filesystem(uri)
        self.writer_id = writer_id or new_writer_id()
        self.flush_records = int(flush_records)
        self.flush_seconds = float(flush_seconds)
        self.max_buffered = int(max_buffered)
        self.transform = transform or _plain_frame
        self.on_drop = on_drop
        self.close_timeout = float(close_timeout)
        self.written = 0
        self.dropped = 0
        self.files: list[str] = []
        self._chunks: list[_Chunk] = []
        self._pending = 0
        self._closed = False
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"tuneloop-{kind}-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def pending(self) -> int:
        """Records accepted but not yet written."""
        return self._pending

    def write(self, records: list[dict[str, Any]]) -> bool:
        """Queue records; False (and counted as dropped) when the buffer is full or the writer closed."""
        if not records:
            return True
        with self._lock:
            if self._closed or self._pending + len(records) > self.max_buffered:
                self.dropped += len(records)
                reason = "closed" if self._closed else f"{self._pending} records already waiting"
                logger.warning("%s log %s: dropped %d records (%s)", self.kind, safe_uri(self.uri), len(records),
                               reason)
                if self.on_drop is not None:
                    self.on_drop(len(records))
                return False
            self._pending += len(records)
        self._queue.put(records)
        return True

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Try to write everything queued so far; True when all of it is written within ``timeout``."""
        if not self._thread.is_alive():
            return self._pending == 0
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout) and self._pending == 0

    def close(self, timeout: float | None = None) -> None:
        """Flush (retrying an unreachable store up to ``close_timeout``) and stop (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_Stop())
        self._thread.join(self.close_timeout + 5.0 if timeout is None else timeout)
        if self._pending:
            logger.error("%s log %s: %d records could not be written before shutdown", self.kind,
                         safe_uri(self.uri), self._pending)
        atexit.unregister(self.close)

    def _run(self) -> None:
        buffer: list[dict[str, Any]] = []
        deadline: float | None = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, list):
                buffer.extend(item)
                if deadline is None:
                    deadline = time.monotonic() + self.flush_seconds
                if len(buffer) < self.flush_records:
                    continue
            if buffer:
                self._cut(buffer)
                buffer = []
            deadline = None if self._write_chunks() else time.monotonic() + self.flush_seconds
            if isinstance(item, _Stop):
                self._drain()
            if isinstance(item, _Flush):
                item.done.set()
                if isinstance(item, _Stop):
                    return

    def _drain(self) -> None:
        """On close: retry the unwritten files until ``close_timeout``."""
        give_up = time.monotonic() + self.close_timeout
        while self._chunks and time.monotonic() < give_up:
            time.sleep(min(1.0, self.flush_seconds, max(0.0, give_up - time.monotonic())))
            self._write_chunks()

    def _cut(self, records: list[dict[str, Any]]) -> None:
        """Group buffered records by partition into chunks, each with its final file name."""
        by_partition: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for record in records:
            by_partition.setdefault(partition_of(record[PARTITION_TIME[self.kind]]), []).append(record)
        for (date, hour), rows in sorted(by_partition.items()):
            times = [_utc(row[PARTITION_TIME[self.kind]]) for row in rows]
            name = file_name(self.writer_id, next(self._sequence), min(times), max(times))
            self._chunks.append(_Chunk(path=f"{partition_path(self.root, self.kind, date, hour)}/{name}",
                                       records=rows))

    def _write_chunks(self) -> bool:
        """Write the waiting chunks in order; False at the first failure (the rest wait)."""
        while self._chunks:
            chunk = self._chunks[0]
            try:
                if chunk.table is None:
                    chunk.table = _table(self.transform(chunk.records))
                write_table_atomically(self.fs, chunk.path, chunk.table)
            except Exception as error:  # fsspec back-ends raise their own types
                logger.warning("%s log %s: writing %d records failed (%s: %s); %d records wait, retrying in %.1fs",
                               self.kind, safe_uri(self.uri), len(chunk.records), type(error).__name__,
                               str(error).splitlines()[0] if str(error) else "", self._pending, self.flush_seconds)
                return False
            self._chunks.pop(0)
            with self._lock:
                self._pending -= len(chunk.records)
                self.written += len(chunk.records)
            self.files.append(chunk.path)
        return True


def _plain_frame(records: list[dict[str, Any]]) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame.from_records(records)


def with_text_features(records: list[dict[str, Any]]) -> "pd.DataFrame":
    """Prediction records as the log's frame: the text-statistics features inserted after ``text``
    (computed by :func:`tuneloop.features.text_statistics`, the implementation training uses)."""
    import pandas as pd

    from tuneloop.features import text_statistics

    frame = pd.DataFrame.from_records(records)
    frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
    features = text_statistics(frame[TEXT])
    position = list(frame.columns).index(TEXT) + 1
    head, tail = frame.iloc[:, :position], frame.iloc[:, position:]
    return pd.concat([head, features.reset_index(drop=True), tail], axis=1)


# --------------------------------------------------------------------------------------------
# Reading


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
    dates = [d for d in _dates(fs, root, kind, uri)
             if (start is None or d >= partition_of(start)[0]) and (end is None or d <= partition_of(end)[0])]
    result = LogRead(frame=pd.DataFrame(columns=wanted or list(required)))
    frames: list[pd.DataFrame] = []
    counted = Counter()
    kept = 0
    for date in (reversed(dates) if last else dates):
        files = _log_files(_list(fs, f"{root}/{kind}/{DATE}={date}", uri, recursive=True))
        fragments = _fragments(fs, root, kind, files, partitions)
        hours: dict[tuple[str, int], list] = {}
        for fragment in fragments:
            hours.setdefault(_hour_key(fragment), []).append(fragment)
        for key in sorted(hours, reverse=bool(last)):
            for fragment in hours[key]:
                table = _read_fragment(fs, fragment, wanted, required, rows_filter, result)
                if table is None:
                    continue
                frame = table.to_pandas()
                if version is not None:
                    versions = frame[MODEL_VERSION].astype(str)
                    counted.update(versions[versions != str(version)].tolist())
                    frame = frame[versions == str(version)]
                kept += len(frame)
                frames.append(frame)
            if last and kept >= last:
                break
        if last and kept >= last:
            break
    result.other_versions = {str(k): int(v) for k, v in sorted(counted.items())}
    if frames:
        result.frame = pd.concat(frames, ignore_index=True)
        if time_column in result.frame.columns:
            result.frame[time_column] = pd.to_datetime(result.frame[time_column], utc=True)
    return result


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


def _read_fragment(fs, fragment, wanted, required, rows_filter, result: LogRead):
    """One file's table, or None when it is skipped (and then named in ``result``)."""
    path = _display(fs, fragment.path)
    try:
        names = set(fragment.physical_schema.names)
        missing = [column for column in required if column not in names]
        if missing:
            result.files_skipped.append({"path": path, "reason": f"missing columns {', '.join(missing)}"})
            return None
        columns = None if wanted is None else [column for column in wanted if column in names]
        table = fragment.to_table(columns=columns, filter=rows_filter)
    except Exception as error:  # pyarrow raises several types for a corrupt or truncated file
        _raise_if_store_down(fs, fragment.path, path, error)
        reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        result.files_skipped.append({"path": path, "reason": reason})
        return None
    result.files_read.append(path)
    return table


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
    read = LogRead(frame=None)
    found = None
    for fragment in _fragments(fs, root, PREDICTIONS, files):
        table = _read_fragment(fs, fragment, list(LOOKUP_COLUMNS), LOOKUP_COLUMNS,
                               ds.field(REQUEST_ID) == request_id, read)
        if table is not None and table.num_rows:
            found = table.slice(0, 1).to_pylist()[0]
            break
    for skipped in read.files_skipped:
        logger.warning("prediction log: skipped unreadable file %s: %s", skipped["path"], skipped["reason"])
    return found


# --------------------------------------------------------------------------------------------
# One replica's log


class PredictionLog:
    """The prediction log of one serving process: its two writers, its recent ids, and lookups.

    Args:
        uri: the log URI; checked at once (:func:`check_store`).
        on_drop: called with the number of records dropped.

    Raises:
        ServiceUnavailableError: the object store does not answer at start.
        ConfigError: its bucket does not exist, or the local folder cannot be made.
    """

    def __init__(self, uri: str, *, flush_records: int = 1000, flush_seconds: float = 5.0,
                 max_buffered: int = 100_000, on_drop: Callable[[int], None] | None = None,
                 writer_id: str | None = None) -> None:
        check_store(uri)
        self.uri = uri
        self.writer_id = writer_id or new_writer_id()
        self.flush_seconds = float(flush_seconds)
        options = dict(writer_id=self.writer_id, flush_records=flush_records, flush_seconds=flush_seconds,
                       max_buffered=max_buffered, on_drop=on_drop)
        self.predictions = LogWriter(uri, PREDICTIONS, transform=with_text_features, **options)
        self.feedback = LogWriter(uri, FEEDBACK, **options)
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._recent_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: "TuneloopConfig", *, on_drop: Callable[[int], None] | None = None,
                    environ: Mapping[str, str] | None = None) -> "PredictionLog":
        """The log of ``deployment``: its URI and flush settings."""
        deployment = config.deployment
        return cls(prediction_log_uri(config, environ), flush_records=deployment.log_flush_records,
                   flush_seconds=deployment.log_flush_seconds, max_buffered=deployment.log_max_buffered,
                   on_drop=on_drop)

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
        found = find_prediction(self.uri, request_id)
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
