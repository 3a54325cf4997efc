"""The buffered, background writer of the prediction log (:class:`LogWriter`)."""

from __future__ import annotations

import atexit
import datetime as dt
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tuneloop.prediction_log import layout
from tuneloop.prediction_log.layout import (
    KINDS,
    PARTITION_TIME,
    PREDICTIONS,
    _table,
    _utc,
    file_name,
    filesystem,
    new_writer_id,
    partition_of,
    partition_path,
    safe_uri,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("tuneloop.prediction_log")


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
        """Queue records; False (and counted as dropped) when the buffer is full or the writer closed.

        Raises:
            ValueError: a record without its partition time (a datetime), which no file could hold.
        """
        if not records:
            return True
        column = PARTITION_TIME[self.kind]
        if not all(isinstance(record.get(column), dt.datetime) for record in records):
            raise ValueError(f"every {self.kind} record needs {column!r} as a datetime (its partition time)")
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
                layout.write_table_atomically(self.fs, chunk.path, chunk.table)
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
