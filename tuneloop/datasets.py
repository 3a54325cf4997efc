"""Reading tables and the Dataset contract shared by every stage.

The Dataset artifact is one Parquet file with the entity key, ``event_timestamp`` (UTC, tz-aware),
the text column, the label column, the text-statistics feature columns, and ``split`` in
{train, validation, test}. Splits come from a stable hash of the entity key, so a retrain never moves
a test row into training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pandas as pd

from tuneloop.config import is_uri
from tuneloop.errors import DataError, ServiceUnavailableError

SPLIT_COLUMN = "split"
SPLITS = ("train", "validation", "test")
DATASET_FILE = "dataset.parquet"


def read_table(location: str | Path, *, what: str = "data file") -> pd.DataFrame:
    """Read a CSV or Parquet file, a local path or an object-store URI (``s3://bucket/key``).

    Object-store clients find their endpoint and credentials in the environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...); a config never holds them, so messages name
    the URI as configured.

    Raises:
        DataError: the file is missing, has an unsupported suffix, or cannot be parsed.
        ServiceUnavailableError: the object store could not be reached (retry later).
    """
    if is_uri(location):
        return _read_remote_table(str(location), what)
    path = Path(location)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}", path=str(path))
    reader = _table_reader(path.suffix.lower(), what=what, location=str(path))
    try:
        return reader(path)
    except Exception as error:  # pandas and pyarrow raise many types for a bad file
        raise DataError(f"{what} {path} cannot be read: {error}", path=str(path)) from error


def _table_reader(suffix: str, *, what: str, location: str):
    if suffix == ".parquet":
        return pd.read_parquet
    if suffix in {".csv", ".tsv"}:
        return lambda source: pd.read_csv(source, sep="\t" if suffix == ".tsv" else ",")
    raise DataError(f"{what} {location}: unsupported format {suffix!r} (use .csv or .parquet)", path=location)


def _read_remote_table(uri: str, what: str) -> pd.DataFrame:
    import fsspec

    reader = _table_reader(PurePosixPath(urlsplit(uri).path).suffix.lower(), what=what, location=uri)
    try:
        filesystem, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True)  # endpoint from env now
        if filesystem.info(path).get("type") != "file":  # info, not isfile: isfile hides outages
            raise FileNotFoundError(uri)
        with filesystem.open(path, "rb") as handle:
            return reader(handle)
    except FileNotFoundError as error:
        raise DataError(f"{what} not found: {uri}", path=uri) from error
    except Exception as error:
        raise_if_unreachable(error, f"reading {what} {uri}", uri, path=uri)
        raise DataError(f"{what} {uri} cannot be read: {error}", path=uri) from error


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) means a service could not be reached, not bad input."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)) or _is_botocore_connection_error(current):
            return True
        if any(marker in str(current) for marker in _CONNECTION_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def raise_if_unreachable(error: BaseException, doing: str, uri: str, **fields) -> None:
    """Raise ServiceUnavailableError (from ``error``) when ``error`` means the object store at ``uri``
    could not be reached while ``doing``; ``fields`` go on the error as well."""
    if is_connection_error(error):
        raise ServiceUnavailableError(
            f"object store unreachable while {doing}: {type(error).__name__}",
            service="object store", uri=uri, **fields,
        ) from error


_CONNECTION_MARKERS = ("NETWORK_CONNECTION", "Could not connect to the endpoint", "Connection refused")


def _is_botocore_connection_error(error: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotocoreConnectionError
    except ImportError:  # no object-store client installed: nothing of it can be raised
        return False
    return isinstance(error, BotocoreConnectionError)


def require_columns(frame: pd.DataFrame, columns: list[str], *, path: str | Path, what: str) -> None:
    """Fail with a message naming the file and every missing column.

    Raises:
        DataError: one or more columns are absent.
    """
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(
            f"{what} {path} has no column {', '.join(repr(c) for c in missing)} "
            f"(columns present: {', '.join(map(str, frame.columns))})",
            path=str(path),
            field=missing[0],
        )


def assign_split(entity_key: str, *, validation: float, test: float, salt: str) -> str:
    """The split of one entity, from a stable hash of its key.

    The same key always lands in the same split for the same shares and salt, whatever else the
    data holds, so a retrain on more data never moves a test row into training.
    """
    digest = hashlib.sha256(f"{salt}:{entity_key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    if bucket < test:
        return "test"
    if bucket < test + validation:
        return "validation"
    return "train"


def fingerprint_frame(frame: pd.DataFrame) -> str:
    """A content hash of a frame (row order and column order independent), for lineage tags."""
    ordered = frame.reindex(sorted(frame.columns), axis=1)
    row_hashes = pd.util.hash_pandas_object(ordered.astype(str), index=False).sort_values()
    return hashlib.sha256(row_hashes.to_numpy().tobytes()).hexdigest()[:16]


def read_dataset(path: str | Path) -> pd.DataFrame:
    """Read a Dataset artifact: Parquet, whatever its file name (KFP artifact paths have no suffix).

    Raises:
        DataError: the file is missing or not Parquet.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset artifact not found: {path}", path=str(path))
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a bad file
        raise DataError(f"dataset artifact {path} is not a readable Parquet file: {error}", path=str(path)) from error


def load_split(dataset_path: str | Path, split: str) -> pd.DataFrame:
    """Rows of one split of a Dataset artifact (a directory holding ``dataset.parquet``, or the file).

    Raises:
        DataError: the artifact is missing, lacks the split column, or holds no rows of that split.
    """
    path = Path(dataset_path)
    if path.is_dir():
        path = path / DATASET_FILE
    frame = read_dataset(path)
    require_columns(frame, [SPLIT_COLUMN], path=path, what="dataset artifact")
    rows = frame[frame[SPLIT_COLUMN] == split].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"dataset artifact {path} has no rows in split {split!r}", path=str(path), field=split)
    return rows
