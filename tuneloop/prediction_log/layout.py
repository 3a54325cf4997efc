"""Names and storage of the prediction log: URIs, partitions, request ids, file names, atomic writes.

See :mod:`tuneloop.prediction_log` for the format these functions implement.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tuneloop.errors import ConfigError, ServiceUnavailableError
from tuneloop.redaction import redact_url
from tuneloop.world import is_object_store_uri

if TYPE_CHECKING:
    import pandas as pd

    from tuneloop.config import TuneloopConfig

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
    ``<state_dir>/predictions`` (a relative local path is taken against the working directory).

    Raises:
        ConfigError: ``world: cluster`` with a log only this pod would see (:func:`require_shared`).
    """
    environ = os.environ if environ is None else environ
    uri = (environ.get(LOG_URI_ENV) or "").strip() or config.deployment.prediction_log_uri \
        or str(Path(config.state_dir) / "predictions")
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    uri = uri.rstrip("/")
    require_shared(config, uri)
    return uri


def require_shared(config: "TuneloopConfig", uri: str) -> None:
    """In a cluster, refuse a log that only this pod would see: every replica and the monitor must
    share it through an object store.

    Raises:
        ConfigError: ``world: cluster`` with a log URI that is not an object-store URI.
    """
    if config.world == "cluster" and not is_object_store_uri(uri):
        raise ConfigError(f"deployment.prediction_log_uri: {safe_uri(uri)!r} is pod-local; in a cluster every "
                          f"serving replica and the monitor must share the log: use an object-store URI "
                          f"(s3://bucket/prefix)", stage=STAGE, field="deployment.prediction_log_uri")


def safe_uri(uri: str) -> str:
    """``uri`` without credentials, for messages (:func:`tuneloop.redaction.redact_url`)."""
    return redact_url(uri)


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
