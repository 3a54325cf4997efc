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

from tuneloop.prediction_log.layout import (
    CONFIDENCE,
    DATE,
    FEEDBACK,
    HOUR,
    KINDS,
    LABEL,
    LOG_URI_ENV,
    MODEL_VERSION,
    PARTITION_TIME,
    PREDICTED_LABEL,
    PREDICTIONS,
    PROBABILITY_PREFIX,
    REQUEST_ID,
    REQUEST_ID_FORMAT,
    SERVED_AT,
    SERVICE,
    STAGE,
    TEXT,
    TIMESTAMP,
    append,
    check_store,
    file_name,
    filesystem,
    new_request_id,
    new_writer_id,
    partition_of,
    partition_path,
    prediction_log_uri,
    request_id_time,
    require_shared,
    safe_uri,
    unreachable,
    with_text_features,
    write_table_atomically,
)
from tuneloop.prediction_log.reader import (
    LOOKUP_COLUMNS,
    LogRead,
    PredictionNotFound,
    find_prediction,
    list_files,
    read_feedback,
    read_log,
    read_predictions,
)
from tuneloop.prediction_log.replica import PredictionLog
from tuneloop.prediction_log.writer import LogWriter

__all__ = [
    "CONFIDENCE", "DATE", "FEEDBACK", "HOUR", "KINDS", "LABEL", "LOG_URI_ENV", "LOOKUP_COLUMNS", "MODEL_VERSION",
    "PARTITION_TIME", "PREDICTED_LABEL", "PREDICTIONS", "PROBABILITY_PREFIX", "REQUEST_ID", "REQUEST_ID_FORMAT",
    "SERVED_AT", "SERVICE", "STAGE", "TEXT", "TIMESTAMP", "LogRead", "LogWriter", "PredictionLog",
    "PredictionNotFound", "append", "check_store", "file_name", "filesystem", "find_prediction", "list_files", "new_request_id",
    "new_writer_id", "partition_of", "partition_path", "prediction_log_uri", "read_feedback", "read_log",
    "read_predictions", "request_id_time", "require_shared", "safe_uri", "unreachable", "with_text_features",
    "write_table_atomically",
]
