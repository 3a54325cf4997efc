"""The Feast objects of a config, and the texts source they read.

The texts source is a URI every process that reads the registry can reach: ``data.texts`` itself
when it already is a Parquet file with a string id, a string text and a UTC timestamp, else a
normalised copy at ``<features.offline_uri>/<name>_texts.parquet`` (default offline location:
``<state_dir>/feature_data``; in a cluster an ``s3://`` prefix). The copy carries the fingerprint of
the texts it was made from in its Parquet metadata, so a reader can tell a stale copy from a
current one without writing anything.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from tuneloop.config import TuneloopConfig, is_uri
from tuneloop.datasets import fingerprint_frame, raise_if_unreachable, read_table, require_columns
from tuneloop.errors import DataError
from tuneloop.features.statistics import STATISTIC_COLUMNS, is_missing

STAGE = "features"
EVENT_TIMESTAMP = "event_timestamp"
"""The timestamp column of the Dataset artifact (and of the entity frame Feast joins on)."""
STATISTICS_VIEW = "text_statistics"
"""Name of the on-demand feature view that computes :data:`STATISTIC_COLUMNS`."""
ORIGIN_FINGERPRINT_KEY = b"tuneloop.texts_fingerprint"
"""Parquet metadata key of a prepared texts copy: the fingerprint of the texts it was made from."""
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
"""The standard variable naming a custom S3 endpoint; pyarrow's S3 client (which Feast uses) ignores
it, so it is passed to each FileSource as ``s3_endpoint_override``."""


@contextmanager
def quiet_feast():
    """Silence Feast's "on demand feature view is experimental" warning (we rely on it on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature")
        yield


def sanitize_name(name: str) -> str:
    """A Feast-safe object name: lowercase letters, digits and underscores, starting with a letter."""
    cleaned = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"m_{cleaned}"
    return cleaned


def feature_service_name(config: TuneloopConfig) -> str:
    """The name of the model's feature service (the sanitised ``config.name``)."""
    return sanitize_name(config.name)


# --------------------------------------------------------------------------------------------
# The texts source


def offline_location(config: TuneloopConfig) -> str:
    """Where prepared sources live: ``features.offline_uri``, else ``<state_dir>/feature_data``."""
    location = config.features.offline_uri or str(Path(config.state_dir) / "feature_data")
    return location if is_uri(location) else str(Path(location).resolve())


def prepared_texts_uri(config: TuneloopConfig) -> str:
    """The URI of the normalised texts copy (used when ``data.texts`` is not ready for Feast)."""
    return f"{offline_location(config).rstrip('/')}/{sanitize_name(config.name)}_texts.parquet"


def _filesystem(location: str):
    import fsspec

    return fsspec.core.url_to_fs(location, skip_instance_cache=True)  # endpoint from the env now


def _parquet_schema(location: str):
    """The Parquet schema at ``location``, or None when it is missing or not Parquet."""
    import pyarrow.parquet as pq

    try:
        filesystem, path = _filesystem(location)
        with filesystem.open(path, "rb") as handle:
            return pq.read_schema(handle)
    except Exception as error:
        raise_if_unreachable(error, f"reading {location}", location, stage=STAGE)
        return None  # missing or unreadable: read_table reports it when it matters


def _schema_is_ready(schema, config: TuneloopConfig) -> bool:
    """Whether a texts schema already has string id and text columns and a ns UTC timestamp."""
    import pyarrow as pa

    data = config.data
    if schema is None or not {data.id_column, data.timestamp_column, data.text_column} <= set(schema.names):
        return False
    is_text = lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind)  # noqa: E731
    timestamp = schema.field(data.timestamp_column).type
    return (
        is_text(schema.field(data.id_column).type)
        and is_text(schema.field(data.text_column).type)
        and pa.types.is_timestamp(timestamp)
        and timestamp.unit == "ns"
        and timestamp.tz in {"UTC", "Etc/UTC", "+00:00"}
    )


def _suffix(location: str) -> str:
    path = urlsplit(location).path if is_uri(location) else location
    return Path(path).suffix.lower()


def texts_are_ready(config: TuneloopConfig) -> bool:
    """Whether Feast can read ``data.texts`` as it is (Parquet, string id and text, UTC timestamp)."""
    texts = config.data.texts
    return _suffix(texts) == ".parquet" and _schema_is_ready(_parquet_schema(texts), config)


def texts_source_uri(config: TuneloopConfig) -> str:
    """The URI the texts FileSource registers: ``data.texts`` when ready, else the prepared copy.

    Reads at most a Parquet footer; writes nothing.
    """
    return config.data.texts if texts_are_ready(config) else prepared_texts_uri(config)


def to_utc(values: pd.Series, *, column: str, path: Path | str) -> pd.Series:
    """A column as tz-aware UTC nanosecond timestamps (naive values are read as UTC).

    Raises:
        DataError: naming the file and the column, when the values are not timestamps.
    """
    try:
        return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]")
    except (ValueError, TypeError) as error:
        raise DataError(
            f"{path}: column {column!r} does not hold timestamps: {error}",
            stage=STAGE,
            path=str(path),
            field=column,
        ) from error


def normalised_texts(config: TuneloopConfig) -> pd.DataFrame:
    """The texts file as Feast reads it: id and text as strings, the timestamp as UTC.

    Raises:
        DataError: the texts file is missing, unreadable, lacks a column, or has bad timestamps.
        ServiceUnavailableError: the object store holding it could not be reached.
    """
    data = config.data
    frame = read_table(data.texts, what="texts file")
    columns = [data.id_column, data.timestamp_column, data.text_column]
    require_columns(frame, columns, path=data.texts, what="texts file")
    frame = frame[columns].copy()
    frame[data.id_column] = frame[data.id_column].astype(str)
    frame[data.timestamp_column] = to_utc(frame[data.timestamp_column], column=data.timestamp_column,
                                          path=data.texts)
    frame[data.text_column] = [None if is_missing(v) else str(v) for v in frame[data.text_column]]
    return frame.reset_index(drop=True)


def prepare_texts(config: TuneloopConfig) -> str:
    """Make the texts source Feast reads, and return its URI (see :func:`texts_source_uri`).

    A ``data.texts`` that is ready is used as it is. Otherwise a normalised copy is written to
    :func:`prepared_texts_uri` (atomically on a local disk; an object-store upload is published
    whole), unless a copy made from the same texts is already there.

    Raises:
        DataError: the texts file is missing, unreadable, lacks a column, or has bad timestamps.
        ServiceUnavailableError: the object store could not be reached.
    """
    if texts_are_ready(config):
        return config.data.texts
    frame = normalised_texts(config)
    fingerprint = fingerprint_frame(frame)
    target = prepared_texts_uri(config)
    if prepared_fingerprint(target) == fingerprint:
        print(f"[features] texts source {target} is current", flush=True)
        return target
    _write_prepared(frame, target, fingerprint)
    print(f"[features] texts {config.data.texts} normalised to {target}", flush=True)
    return target


def prepared_fingerprint(location: str) -> str | None:
    """The fingerprint recorded in a prepared texts copy, or None when there is none."""
    schema = _parquet_schema(location)
    if schema is None or not schema.metadata:
        return None
    value = schema.metadata.get(ORIGIN_FINGERPRINT_KEY)
    return value.decode() if value else None


def _write_prepared(frame: pd.DataFrame, location: str, fingerprint: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), ORIGIN_FINGERPRINT_KEY: fingerprint})
    try:
        if not is_uri(location):
            target = Path(location)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            pq.write_table(table, temporary)
            os.replace(temporary, target)
            return
        filesystem, path = _filesystem(location)
        with filesystem.open(path, "wb") as handle:
            pq.write_table(table, handle)
    except Exception as error:
        raise_if_unreachable(error, f"writing {location}", location, stage=STAGE)
        raise DataError(f"cannot write the texts source {location}: {error}", stage=STAGE, path=location) from error


# --------------------------------------------------------------------------------------------
# Feast objects


def _udf_source(text_column: str) -> str:
    # Feast stores the UDF's source in the registry and rebuilds the callable from it (exec in a
    # namespace holding only pandas and numpy), so the source must be self-contained: it imports
    # the shared implementation instead of closing over anything.
    return (
        "def text_statistics_udf(inputs: pd.DataFrame) -> pd.DataFrame:\n"
        '    """Text statistics of the text feature (tuneloop.features.text_statistics)."""\n'
        "    from tuneloop.features import text_statistics\n"
        "\n"
        f"    return text_statistics(inputs[{text_column!r}]).reset_index(drop=True)\n"
    )


def _make_udf(text_column: str):
    import numpy as np

    source = _udf_source(text_column)
    namespace: dict = {"__name__": "tuneloop_feast_udf", "pd": pd, "pandas": pd, "np": np}
    exec(source, namespace)  # noqa: S102 - our own fixed source, parameterised by a repr()
    return namespace["text_statistics_udf"], source


@dataclass(frozen=True)
class FeatureDefinitions:
    """The Feast objects of one config; :meth:`objects` is what ``store.apply`` takes."""

    entity: object
    source: object
    texts_view: object
    statistics_view: object
    feature_service: object
    texts_path: str

    def objects(self) -> list:
        return [self.entity, self.source, self.texts_view, self.statistics_view, self.feature_service]


def build_definitions(config: TuneloopConfig, texts_uri: str | None = None) -> FeatureDefinitions:
    """The Feast objects of a config (builds objects only; writes nothing).

    - Entity ``<name>_entity``: join key ``data.id_column``, string.
    - FileSource ``<name>_texts_source`` on ``texts_uri`` (default :func:`texts_source_uri`),
      timestamp field ``data.timestamp_column``; an ``s3://`` source gets ``$AWS_ENDPOINT_URL`` of
      this process as its endpoint override.
    - FeatureView ``<name>_texts``: the text column, ttl ``features.ttl_days``.
    - OnDemandFeatureView ``text_statistics`` (pandas mode): :func:`text_statistics` of the text.
    - FeatureService ``<name>``: both views, for training and serving.

    ``<name>`` is :func:`sanitize_name` of ``config.name``.
    """
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.types import Float64, Int64, String

    data = config.data
    prefix = sanitize_name(config.name)
    texts_uri = texts_uri or texts_source_uri(config)
    entity = Entity(
        name=f"{prefix}_entity",
        join_keys=[data.id_column],
        value_type=ValueType.STRING,
        description=f"One text of {config.name}, keyed by {data.id_column!r}.",
    )
    endpoint = os.environ.get(ENDPOINT_ENV) if texts_uri.startswith("s3://") else None
    source = FileSource(
        name=f"{prefix}_texts_source",
        path=texts_uri,
        timestamp_field=data.timestamp_column,
        s3_endpoint_override=endpoint or None,
        description="Texts with the time each version became known.",
    )
    texts_view = FeatureView(
        name=f"{prefix}_texts",
        entities=[entity],
        schema=[Field(name=data.id_column, dtype=String), Field(name=data.text_column, dtype=String)],
        source=source,
        ttl=timedelta(days=config.features.ttl_days),
        online=True,
        description="The text of each entity; the latest version at or before the label time joins.",
    )
    dtypes = {"int64": Int64, "float64": Float64}
    udf, udf_source = _make_udf(data.text_column)
    statistics_view = OnDemandFeatureView(
        name=STATISTICS_VIEW,
        sources=[texts_view],
        schema=[Field(name=name, dtype=dtypes[dtype]) for name, dtype in STATISTIC_COLUMNS.items()],
        udf=udf,
        udf_string=udf_source,
        mode="pandas",
        description="tuneloop.features.text_statistics of the text (shared with serving).",
    )
    feature_service = FeatureService(
        name=feature_service_name(config),
        features=[texts_view, statistics_view],
        description=f"Features of the {config.name} model: the text and its statistics.",
    )
    return FeatureDefinitions(entity, source, texts_view, statistics_view, feature_service, texts_uri)
