"""The window at scale: the prediction-log window scanned by DuckDB, streamed, never loaded whole.

The files of the window come from :func:`tuneloop.prediction_log.list_files` (only the ``date=/hour=``
partitions of the window). Each file's footer is checked first (concurrently): a file that cannot be
read, or lacks a column the monitor needs, is skipped and named, as :func:`~tuneloop.prediction_log.read_log`
does. The rest become one ``pyarrow.dataset`` (any fsspec store: local disk or ``s3://``) with the
monitor's schema (a statistics column a file lacks reads as null), which DuckDB scans in record
batches under ``monitoring.histogram_memory_limit``. From the scan come:

- the records per model version in the window (the monitored version's, the others counted);
- for a record-count window, the newest hour partitions until they hold the N newest records of the
  version, and the cut-off time of the N-th newest (records at that exact time are all kept);
- the exact value counts of every statistic column and of the predicted label over the *whole*
  window (``GROUP BY``; memory bounded by the distinct values, floats rounded to 6 decimals), for
  :mod:`tuneloop.monitoring.histograms`; rows logged without statistics get them from
  :func:`tuneloop.features.text_statistics`, streamed batch by batch;
- a reservoir sample of at most ``monitoring.current_max_rows`` records (text included) for
  Evidently and the embedding signal.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.features import STATISTIC_COLUMNS, text_statistics
from tuneloop.monitoring.common import (
    LOG_COLUMNS,
    REFERENCE_SEED,
    STAGE,
    MonitoringError,
)
from tuneloop.monitoring.window import Window
from tuneloop.prediction_log import (
    MODEL_VERSION,
    PREDICTIONS,
    REQUEST_ID,
    TEXT,
    TIMESTAMP,
    check_store,
    filesystem,
    list_files,
    prediction_log_uri,
    unreachable,
)
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
)

HISTOGRAM_COLUMNS = (*STATISTIC_COLUMNS, PREDICTION)
"""Columns aggregated over the whole window."""
FLOAT_DECIMALS = 6
FOOTER_THREADS = 8
STATISTICS_BATCH = 50_000
"""Rows logged without statistics get them computed this many at a time."""


@dataclass
class CurrentData:
    """The monitored version's records in the window: counted and aggregated whole, sampled for Evidently."""

    frame: pd.DataFrame
    """The bounded sample (all records when the window holds at most ``current_max_rows``), oldest first."""
    window: Window
    start: pd.Timestamp | None
    end: pd.Timestamp
    log_uri: str
    files_read: list[str]
    files_skipped: list[dict]
    other_versions: dict[str, int]
    rows_in_window: int
    rows: int = 0
    """Records of the monitored version in the window (all of them, not the sample)."""
    value_counts: dict[str, pd.Series] = field(default_factory=dict)
    """Per histogram column, the count of each value over the whole window."""
    first_record: pd.Timestamp | None = None
    last_record: pd.Timestamp | None = None
    rows_without_statistics: int = 0


def _schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "float64": pa.float64()}
    return pa.schema([
        pa.field(REQUEST_ID, pa.string()), pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC")),
        pa.field(MODEL_VERSION, pa.string()), pa.field(TEXT, pa.string()), pa.field(PREDICTION, pa.string()),
        *[pa.field(name, types[dtype]) for name, dtype in STATISTIC_COLUMNS.items()],
    ])


def _check_footer(fs, path: str, shown: str) -> tuple[str | None, set[str]]:
    """Why the file cannot be used (None: it can), and its columns. An outage raises instead of
    skipping the file."""
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path, filesystem=fs).names)
    except Exception as error:  # pyarrow raises several types for a corrupt or truncated file
        try:
            fs.invalidate_cache(path)
            fs.info(path)
        except FileNotFoundError:
            return "vanished while being read", set()
        except Exception as probe:  # the store itself does not answer: retry the whole check
            raise unreachable(shown, probe, f"reading {shown}") from error
        return f"{type(error).__name__}: {error}".strip().splitlines()[0], set()
    missing = [column for column in LOG_COLUMNS if column not in names]
    return (f"missing columns {', '.join(missing)}" if missing else None), names


def _usable_files(fs, paths: list[str], uri: str) -> tuple[list[str], list[dict], set[str]]:
    """The readable files, the skipped ones with the reason, and the columns the readable ones hold."""
    from tuneloop.prediction_log.layout import _display

    shown = {path: _display(fs, path) for path in paths}
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, max(len(paths), 1))) as pool:
        checked = list(pool.map(lambda path: _check_footer(fs, path, shown[path]), paths))
    good = [path for path, (reason, _) in zip(paths, checked) if reason is None]
    skipped = [{"path": shown[path], "reason": reason} for path, (reason, _) in zip(paths, checked)
               if reason is not None]
    columns = set().union(*(names for reason, names in checked if reason is None)) if good else set()
    return good, skipped, columns


def _hour_of(path: str) -> str:
    return path.rsplit("/", 1)[0]


def connect(config: TuneloopConfig):
    """A DuckDB connection with the configured memory limit and threads."""
    import duckdb

    from tuneloop.runtime import available_cpus

    monitoring = config.monitoring
    settings = {"memory_limit": monitoring.histogram_memory_limit,
                "threads": monitoring.histogram_threads or available_cpus()}
    return duckdb.connect(config=settings)


def _literal(when: pd.Timestamp) -> str:
    return f"TIMESTAMPTZ '{when.tz_convert('UTC').isoformat()}'"


class _Scan:
    """The DuckDB view ``monitored`` over the window's records of one version."""

    def __init__(self, config: TuneloopConfig, fs, files: list[str], start, end, version: str | None,
                 columns: set[str] | None = None) -> None:
        self.connection = connect(config)
        self.connection.execute("SET TimeZone = 'UTC'")
        self._register(fs, files, columns)
        clauses = [f"{TIMESTAMP} IS NOT NULL", f"{TIMESTAMP} <= {_literal(end)}"]
        if start is not None:
            clauses.append(f"{TIMESTAMP} >= {_literal(start)}")
        self.connection.execute(f"CREATE TEMP VIEW in_window AS SELECT * FROM log_files WHERE {' AND '.join(clauses)}")
        self.version = version
        self._monitored("TRUE")

    def _register(self, fs, files: list[str], columns: set[str] | None) -> None:
        """``log_files``: local files through DuckDB's own Parquet reader (fastest); files on an object
        store through a ``pyarrow.dataset`` on the log's fsspec file system (no DuckDB extension to
        fetch). Either way with the monitor's schema; a column no file holds reads as null."""
        from tuneloop.prediction_log.layout import _is_local

        schema = _schema()
        if _is_local(fs):
            present = columns if columns is not None else set(schema.names)
            types = {"string": "VARCHAR", "int64": "BIGINT", "double": "DOUBLE",
                     "timestamp[us, tz=UTC]": "TIMESTAMPTZ"}
            select = ", ".join(
                f"CAST({field.name} AS {types[str(field.type)]}) AS {field.name}" if field.name in present
                else f"CAST(NULL AS {types[str(field.type)]}) AS {field.name}" for field in schema)
            listed = ", ".join("'" + path.replace("'", "''") + "'" for path in files)
            self.connection.execute(f"CREATE TEMP VIEW log_files AS SELECT {select} FROM read_parquet([{listed}], "
                                    f"union_by_name = true, hive_partitioning = false)")
            return
        import pyarrow.dataset as ds

        self.dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=schema)
        self.connection.register("log_files", self.dataset)

    def _monitored(self, extra: str) -> None:
        version = "TRUE" if self.version is None else f"{MODEL_VERSION} = $$" + str(self.version) + "$$"
        self.connection.execute(f"CREATE OR REPLACE TEMP VIEW monitored AS SELECT * FROM in_window "
                                f"WHERE {version} AND {extra}")

    def versions(self) -> Counter:
        rows = self.connection.execute(f"SELECT {MODEL_VERSION}, count(*) FROM in_window GROUP BY 1").fetchall()
        return Counter({str(version): int(count) for version, count in rows})

    def keep_newest(self, records: int) -> None:
        """Restrict ``monitored`` to its ``records`` newest records (ties at the cut-off kept)."""
        rows = self.connection.execute(f"SELECT {TIMESTAMP} FROM monitored ORDER BY {TIMESTAMP} DESC "
                                       f"LIMIT 1 OFFSET {int(records) - 1}").fetchall()
        row = rows[0] if rows else None
        if row is not None:
            self._monitored(f"{TIMESTAMP} >= {_literal(pd.Timestamp(row[0]))}")

    def count(self) -> int:
        return int(self.connection.execute("SELECT count(*) FROM monitored").fetchall()[0][0])

    def summary(self) -> tuple[int, object, object, int, dict[str, pd.Series]]:
        """Records, first and last time, records lacking a statistic, and the exact value counts of
        every histogram column over the whole window: one scan."""
        missing = " OR ".join(f"{name} IS NULL" for name in STATISTIC_COLUMNS)
        histograms = [f"histogram(round({name}, {FLOAT_DECIMALS}))" if dtype == "float64" else f"histogram({name})"
                      for name, dtype in STATISTIC_COLUMNS.items()] + [f"histogram({PREDICTION})"]
        row = self.connection.execute(
            f"SELECT count(*), min({TIMESTAMP}), max({TIMESTAMP}), count(*) FILTER (WHERE {missing}), "
            f"{', '.join(histograms)} FROM monitored").fetchall()[0]
        counts = {name: pd.Series(dict(histogram or {}), dtype="int64").sort_index()
                  for name, histogram in zip(HISTOGRAM_COLUMNS, row[4:])}
        return int(row[0]), row[1], row[2], int(row[3]), counts

    def add_missing_statistics(self, counts: dict[str, pd.Series]) -> None:
        """Statistics the log lacks for some records, computed from their text, batch by batch."""
        missing = " OR ".join(f"{name} IS NULL" for name in STATISTIC_COLUMNS)
        relation = self.connection.sql(f"SELECT {TEXT}, {', '.join(STATISTIC_COLUMNS)} FROM monitored WHERE {missing}")
        for batch in relation.to_arrow_reader(STATISTICS_BATCH):
            logged = batch.to_pandas()
            statistics = text_statistics(logged[TEXT].fillna(""))
            for name, dtype in STATISTIC_COLUMNS.items():
                values = statistics[name][logged[name].isna().to_numpy()]
                values = values.round(FLOAT_DECIMALS) if dtype == "float64" else values
                counts[name] = counts[name].add(values.value_counts(), fill_value=0).astype("int64").sort_index()

    def sample(self, rows: int, limit: int) -> pd.DataFrame:
        columns = ", ".join([*LOG_COLUMNS, *STATISTIC_COLUMNS])
        if rows <= limit:
            query = f"SELECT {columns} FROM monitored"
        else:
            query = (f"SELECT {columns} FROM monitored "
                     f"USING SAMPLE reservoir({int(limit)} ROWS) REPEATABLE ({REFERENCE_SEED})")
        frame = self.connection.execute(query).fetch_df()
        return frame.sort_values([TIMESTAMP, REQUEST_ID], kind="stable").reset_index(drop=True)

    def close(self) -> None:
        self.connection.close()


def _count_window_files(config: TuneloopConfig, fs, files: list[str], version: str | None, records: int,
                        end: pd.Timestamp, columns: set[str]) -> list[str]:
    """The newest hour partitions' files until they hold ``records`` records of ``version``."""
    hours: dict[str, list[str]] = {}
    for path in files:
        hours.setdefault(_hour_of(path), []).append(path)
    chosen: list[str] = []
    found = 0
    for hour in sorted(hours, reverse=True):
        scan = _Scan(config, fs, hours[hour], None, end, version, columns)
        try:
            found += scan.count()
        finally:
            scan.close()
        chosen = hours[hour] + chosen
        if found >= records:
            break
    return chosen


def scan_window(config: TuneloopConfig, window: Window, version: str | None, *, now: pd.Timestamp) -> CurrentData:
    """Count, aggregate and sample the records of ``version`` in ``window`` (see the module docstring).

    Raises:
        ConfigError: a pod-local log in a cluster, or a bucket that does not exist.
        ServiceUnavailableError: the log's store does not answer.
        MonitoringError: DuckDB could not scan the files (named).
    """
    import duckdb

    uri = prediction_log_uri(config)
    check_store(uri)
    start = now - pd.Timedelta(window.duration) if window.duration else None
    fs, _ = filesystem(uri)
    listed = list_files(uri, PREDICTIONS, start=None if start is None else start.to_pydatetime(),
                        end=now.to_pydatetime())
    files, skipped, columns = _usable_files(fs, listed, uri)
    current = CurrentData(frame=pd.DataFrame(columns=[*LOG_COLUMNS, *STATISTIC_COLUMNS]), window=window, start=start,
                          end=now, log_uri=uri, files_read=[], files_skipped=skipped, other_versions={},
                          rows_in_window=0)
    if not files:
        return current
    try:
        if window.records:
            files = _count_window_files(config, fs, files, version, window.records, now, columns)
        scan = _Scan(config, fs, files, start, now, version, columns)
        try:
            versions = scan.versions()
            if window.records:
                scan.keep_newest(window.records)
            rows, first, last, without, counts = scan.summary()
            current.files_read = [_display_path(fs, path) for path in files]
            current.rows_in_window = sum(versions.values())
            current.other_versions = {v: n for v, n in sorted(versions.items())
                                      if version is not None and v != str(version)}
            current.rows, current.rows_without_statistics = rows, without
            current.first_record = None if first is None else pd.Timestamp(first)
            current.last_record = None if last is None else pd.Timestamp(last)
            if rows:
                current.value_counts = counts
                if without:
                    scan.add_missing_statistics(current.value_counts)
                current.frame = scan.sample(int(rows), config.monitoring.current_max_rows)
        finally:
            scan.close()
    except duckdb.Error as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MonitoringError(f"DuckDB could not scan the prediction log window under {uri}: {message}",
                              stage=STAGE, path=uri) from error
    return current


def _display_path(fs, path: str) -> str:
    from tuneloop.prediction_log.layout import _display

    return _display(fs, path)


def utc_now(now: dt.datetime | None) -> pd.Timestamp:
    """``now`` (or the current time) as a UTC timestamp."""
    stamp = pd.Timestamp(now or dt.datetime.now(dt.timezone.utc))
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
