"""Feature retrieval with Feast: the point-in-time correct training set, split by a stable hash.

The embedded default runs Feast's ``local`` provider: the texts file is the Parquet offline store
(Dask), the online store is SQLite, and the registry is a file; all of it lives under
``<state_dir>/feast``. The same definitions back the Feast CLI repository in ``feature_repo/``.

Training and serving share one implementation of the text statistics, :func:`text_statistics`: the
Feast on-demand feature view calls it when building the training set, and the serving code calls it
on request texts, so the two cannot drift apart.

Public API:

- :func:`text_statistics` the text-statistics features of a Series of texts.
- :func:`build_definitions` the Feast objects (entity, source, views, feature service) of a config.
- :func:`open_store` a :class:`feast.FeatureStore` with those definitions applied.
- :func:`run` the Dataset artifact: labels joined point-in-time to texts, with features and splits.
- :func:`materialize` and :func:`online_features` the SQLite online store and reads from it.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import SPLIT_COLUMN, SPLITS, assign_split, read_table, require_columns
from tuneloop.errors import ConfigError, DataError

STAGE = "features"
EVENT_TIMESTAMP = "event_timestamp"
"""The timestamp column of the Dataset artifact (and of the entity frame Feast joins on)."""
STATISTICS_VIEW = "text_statistics"
"""Name of the on-demand feature view that computes :data:`STATISTIC_COLUMNS`."""

STATISTIC_COLUMNS: dict[str, str] = {
    "char_count": "int64",
    "word_count": "int64",
    "digit_share": "float64",
    "upper_share": "float64",
    "punct_share": "float64",
    "has_url": "int64",
    "has_phone_number": "int64",
    "mean_word_length": "float64",
}
"""The text-statistics feature columns, in order, with their dtypes."""

_URL = re.compile(
    r"(?i)(?:\bhttps?://|\bwww\.|\b[a-z0-9][a-z0-9-]*\.(?:com|net|org|info|biz|co\.uk|uk|io|ly)\b)"
)
_PHONE = re.compile(r"[0-9]{5,}")
_DIGIT = r"[0-9]"
_PUNCT = r"[^\w\s]"


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes are values, not missing scalars
        return False


def _as_text(value: object) -> str:
    if _is_missing(value):
        return ""
    return value if isinstance(value, str) else str(value)


@contextmanager
def _quiet_feast():
    """Silence Feast's "on demand feature view is experimental" warning (we rely on it on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature")
        yield


def text_statistics(texts: pd.Series) -> pd.DataFrame:
    """Text-statistics features of each text; the one implementation for training and serving.

    Missing values (``None``, ``NaN``, ``pd.NA``) count as the empty string; other non-strings are
    converted with ``str``. The result keeps the index of ``texts`` and has these columns:

    - ``char_count`` (int64): number of characters.
    - ``word_count`` (int64): number of whitespace-separated tokens.
    - ``digit_share`` (float64): share of characters that are ASCII digits 0-9.
    - ``upper_share`` (float64): share of characters that are uppercase letters.
    - ``punct_share`` (float64): share of characters that are punctuation or symbols (neither a
      letter, digit, underscore nor whitespace).
    - ``has_url`` (int64, 0/1): holds ``http(s)://``, ``www.`` or a domain with a common TLD.
    - ``has_phone_number`` (int64, 0/1): holds a run of 5 or more consecutive digits.
    - ``mean_word_length`` (float64): non-whitespace characters per token.

    Every share is 0.0 for the empty string, as is ``mean_word_length`` for a text without tokens.
    """
    if not isinstance(texts, pd.Series):
        texts = pd.Series(texts)
    text = pd.Series([_as_text(value) for value in texts], index=texts.index, dtype=object)
    chars = text.str.len().astype("int64")
    words = text.map(lambda t: len(t.split())).astype("int64")
    word_chars = text.map(lambda t: sum(len(w) for w in t.split())).astype("int64")
    digits = text.str.count(_DIGIT).astype("int64")
    uppers = text.map(lambda t: sum(1 for c in t if c.isupper())).astype("int64")
    puncts = text.str.count(_PUNCT).astype("int64")
    denominator = chars.where(chars > 0, 1).astype("float64")
    word_denominator = words.where(words > 0, 1).astype("float64")
    frame = pd.DataFrame(
        {
            "char_count": chars,
            "word_count": words,
            "digit_share": digits / denominator,
            "upper_share": uppers / denominator,
            "punct_share": puncts / denominator,
            "has_url": text.map(lambda t: int(_URL.search(t) is not None)),
            "has_phone_number": text.map(lambda t: int(_PHONE.search(t) is not None)),
            "mean_word_length": word_chars / word_denominator,
        },
        index=texts.index,
    )
    return frame.astype(STATISTIC_COLUMNS)


# --------------------------------------------------------------------------------------------
# Feast definitions


def sanitize_name(name: str) -> str:
    """A Feast-safe object name: lowercase letters, digits and underscores, starting with a letter."""
    cleaned = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"m_{cleaned}"
    return cleaned


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
    texts_path: Path

    def objects(self) -> list:
        return [self.entity, self.source, self.texts_view, self.statistics_view, self.feature_service]


def _to_utc(values: pd.Series, *, column: str, path: Path | str) -> pd.Series:
    try:
        return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]")
    except (ValueError, TypeError) as error:
        raise DataError(
            f"{path}: column {column!r} does not hold timestamps: {error}",
            stage=STAGE,
            path=str(path),
            field=column,
        ) from error


def _parquet_is_ready(path: Path, config: TuneloopConfig) -> bool:
    """Whether a Parquet texts file already has string id and text columns and a UTC timestamp."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:  # unreadable: let read_table report it
        return False
    data = config.data
    names = set(schema.names)
    if not {data.id_column, data.timestamp_column, data.text_column} <= names:
        return False
    id_type = schema.field(data.id_column).type
    ts_type = schema.field(data.timestamp_column).type
    text_type = schema.field(data.text_column).type
    is_text = lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind)  # noqa: E731
    return (
        is_text(id_type)
        and is_text(text_type)
        and pa.types.is_timestamp(ts_type)
        and ts_type.unit == "ns"
        and ts_type.tz in {"UTC", "Etc/UTC", "+00:00"}
    )


def prepare_texts(config: TuneloopConfig) -> Path:
    """The Parquet file Feast reads for the texts: the configured file when it already is Parquet
    with a string id and a UTC timestamp, else a normalised copy under
    ``<state_dir>/feature_data`` (CSV converted, id as string, timestamps tz-aware UTC).

    Raises:
        DataError: the texts file is missing, unreadable, lacks a column, or has bad timestamps.
    """
    data = config.data
    path = Path(data.texts)
    if path.suffix.lower() == ".parquet" and path.is_file() and _parquet_is_ready(path, config):
        return path
    frame = read_table(path, what="texts file")
    columns = [data.id_column, data.timestamp_column, data.text_column]
    require_columns(frame, columns, path=path, what="texts file")
    frame = frame[columns].copy()
    frame[data.id_column] = frame[data.id_column].astype(str)
    frame[data.timestamp_column] = _to_utc(frame[data.timestamp_column], column=data.timestamp_column, path=path)
    frame[data.text_column] = [None if _is_missing(v) else str(v) for v in frame[data.text_column]]
    target = Path(config.state_dir) / "feature_data" / f"{sanitize_name(config.name)}_texts.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(target, index=False)
    print(f"[features] texts {path.name} normalised to {target}", flush=True)
    return target


def feature_service_name(config: TuneloopConfig) -> str:
    """The name of the model's feature service (the sanitised ``config.name``)."""
    return sanitize_name(config.name)


def build_definitions(config: TuneloopConfig) -> FeatureDefinitions:
    """The Feast objects of a config.

    - Entity ``<name>_entity``: join key ``data.id_column``, string.
    - FileSource ``<name>_texts_source`` on the texts Parquet (see :func:`prepare_texts`), timestamp
      field ``data.timestamp_column``.
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
    texts_path = prepare_texts(config)
    entity = Entity(
        name=f"{prefix}_entity",
        join_keys=[data.id_column],
        value_type=ValueType.STRING,
        description=f"One text of {config.name}, keyed by {data.id_column!r}.",
    )
    source = FileSource(
        name=f"{prefix}_texts_source",
        path=str(texts_path),
        timestamp_field=data.timestamp_column,
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
    return FeatureDefinitions(entity, source, texts_view, statistics_view, feature_service, texts_path)


def feast_dir(config: TuneloopConfig) -> Path:
    """Where the registry and the SQLite online store live."""
    return Path(config.state_dir) / "feast"


def repo_config(config: TuneloopConfig):
    """The in-code Feast RepoConfig: local provider, file offline store, SQLite online store."""
    from feast.repo_config import RepoConfig

    directory = feast_dir(config)
    return RepoConfig(
        project=config.features.project,
        provider="local",
        registry=_registry_settings(config, directory),
        offline_store={"type": "file"},
        online_store=_online_store_settings(config, directory),
        entity_key_serialization_version=3,
        repo_path=directory,
    )


def _secret_from_env(variable: str, field: str) -> str:
    """A connection string read from the environment (it holds credentials, so never from config)."""
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(f"{field}: environment variable {variable} is not set", field=field)
    return value


def _registry_settings(config: TuneloopConfig, directory: Path):
    """A SQL registry in a cluster (``features.registry_url_env``), else a file in the state dir."""
    if config.features.registry_url_env:
        url = _secret_from_env(config.features.registry_url_env, "features.registry_url_env")
        return {"registry_type": "sql", "path": url, "cache_ttl_seconds": 60}
    return str(directory / "registry.db")


def _online_store_settings(config: TuneloopConfig, directory: Path) -> dict:
    """Redis in a cluster (``features.redis_connection_env``), else SQLite in the state dir."""
    if config.features.redis_connection_env:
        connection = _secret_from_env(config.features.redis_connection_env, "features.redis_connection_env")
        return {"type": "redis", "connection_string": connection}
    return {"type": "sqlite", "path": str(directory / "online_store.db")}


def open_store(config: TuneloopConfig, definitions: FeatureDefinitions | None = None):
    """A FeatureStore with the config's definitions applied (idempotent: applying twice is a no-op).

    Raises:
        DataError: the texts file cannot be read (see :func:`prepare_texts`).
    """
    from feast import FeatureStore

    directory = feast_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    definitions = definitions or build_definitions(config)
    store = FeatureStore(repo_path=str(directory), config=repo_config(config))
    with _quiet_feast():
        store.apply(definitions.objects())
    return store


# --------------------------------------------------------------------------------------------
# The training set


@dataclass(frozen=True)
class FeatureSummary:
    """What :func:`run` wrote: rows per split, the feature service, rows dropped for lack of text."""

    rows: dict[str, int]
    feature_service: str
    dropped_rows: int = 0
    path: str = ""
    columns: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def _read_labels(config: TuneloopConfig) -> pd.DataFrame:
    data = config.data
    path = Path(data.labels)
    if data.label_column in {data.id_column, EVENT_TIMESTAMP}:
        raise DataError(
            f"label column {data.label_column!r} clashes with the id or timestamp column",
            stage=STAGE,
            field="data.label_column",
        )
    frame = read_table(path, what="labels file")
    require_columns(frame, [data.id_column, data.timestamp_column, data.label_column], path=path, what="labels file")
    unlabelled = frame[data.label_column].isna()
    if unlabelled.any():
        print(f"[features] dropped {int(unlabelled.sum())} rows of {path.name} with no label", flush=True)
        frame = frame[~unlabelled]
    labels = pd.DataFrame(
        {
            data.id_column: frame[data.id_column].astype(str),
            EVENT_TIMESTAMP: _to_utc(frame[data.timestamp_column], column=data.timestamp_column, path=path),
            data.label_column: frame[data.label_column].astype(str),
        }
    )
    # Feast keeps one row per (key, timestamp); keep the last label given for it, and say so.
    duplicated = labels.duplicated([data.id_column, EVENT_TIMESTAMP], keep="last")
    if duplicated.any():
        print(f"[features] dropped {int(duplicated.sum())} repeated labels (same id and timestamp)", flush=True)
        labels = labels[~duplicated]
    return labels.reset_index(drop=True)


def _dataset_file(dataset_path: str | Path) -> Path:
    """``dataset_path`` as the file to write (a KFP ``Output[Dataset].path`` is a file path, with or
    without a suffix); an empty directory already there is replaced by the file."""
    target = Path(dataset_path)
    if target.is_dir():
        if any(target.iterdir()):
            raise DataError(
                f"dataset path {target} is a directory that is not empty", stage=STAGE, path=str(target)
            )
        target.rmdir()
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def run(config: TuneloopConfig, dataset_path: str | Path) -> FeatureSummary:
    """Build the Dataset artifact: each label joined point-in-time to its text, with features.

    A label joins the latest version of its text whose timestamp is at or before the label's
    timestamp and no older than ``features.ttl_days``. Labels whose text does not join are dropped.
    ``split`` comes from :func:`tuneloop.datasets.assign_split` of the id. One Parquet file is
    written at exactly ``dataset_path`` (parents created), with the columns id, ``event_timestamp``
    (UTC), text, label, :data:`STATISTIC_COLUMNS` and ``split``.

    Raises:
        DataError: a data file is missing or lacks a column, no label joins a text, or a split is
            empty.
    """
    data = config.data
    split = config.features.split
    labels = _read_labels(config)
    print(f"[features] {len(labels)} labels from {Path(data.labels).name}", flush=True)
    if labels.empty:
        raise DataError(f"labels file {data.labels} holds no rows", stage=STAGE, path=str(data.labels))

    definitions = build_definitions(config)
    store = open_store(config, definitions)
    service = store.get_feature_service(definitions.feature_service.name)
    print(f"[features] point-in-time join through feature service {service.name!r}", flush=True)
    with _quiet_feast():
        joined = store.get_historical_features(entity_df=labels, features=service).to_df()

    # Feast returns a null text for an unknown id, but leaves out the label rows of a known id
    # whose every text version is newer than the label (or older than the ttl): count both.
    joined = joined[joined[data.text_column].notna()]
    dropped = len(labels) - len(joined)
    if dropped:
        print(
            f"[features] dropped {dropped} labels with no text at or before their timestamp "
            f"(within ttl_days={config.features.ttl_days})",
            flush=True,
        )
    if joined.empty:
        raise DataError(
            f"no label in {data.labels} joined a text in {data.texts} "
            f"(ids, timestamps or ttl_days={config.features.ttl_days} do not match)",
            stage=STAGE,
            path=str(data.labels),
        )

    columns = [data.id_column, EVENT_TIMESTAMP, data.text_column, data.label_column, *STATISTIC_COLUMNS]
    dataset = joined[columns].copy()
    dataset[EVENT_TIMESTAMP] = pd.to_datetime(dataset[EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    dataset[data.id_column] = dataset[data.id_column].astype(str)
    dataset[data.label_column] = dataset[data.label_column].astype(str)
    dataset = dataset.astype(STATISTIC_COLUMNS)
    dataset[SPLIT_COLUMN] = [
        assign_split(key, validation=split.validation, test=split.test, salt=split.salt)
        for key in dataset[data.id_column]
    ]
    dataset = dataset.sort_values([EVENT_TIMESTAMP, data.id_column], kind="stable").reset_index(drop=True)

    rows = {name: int((dataset[SPLIT_COLUMN] == name).sum()) for name in SPLITS}
    empty = [name for name, count in rows.items() if count == 0]
    if empty:
        raise DataError(
            f"split {empty[0]!r} is empty ({len(dataset)} rows; shares validation={split.validation}, "
            f"test={split.test}): add data or change features.split",
            stage=STAGE,
            field=empty[0],
        )

    target = _dataset_file(dataset_path)
    dataset.to_parquet(target, index=False)
    print(
        f"[features] wrote {len(dataset)} rows to {target} "
        + ", ".join(f"{name}={count}" for name, count in rows.items()),
        flush=True,
    )
    return FeatureSummary(
        rows=rows,
        feature_service=service.name,
        dropped_rows=dropped,
        path=str(target),
        columns=list(dataset.columns),
    )


# --------------------------------------------------------------------------------------------
# The online store


def materialize(config: TuneloopConfig, end_date: datetime | None = None, *, store=None) -> None:
    """Load the latest text of each entity (as of ``end_date``, default now) into the SQLite
    online store, looking back ``features.ttl_days``."""
    store = store or open_store(config)
    end = pd.Timestamp(end_date or datetime.now(timezone.utc))
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    start = end - pd.Timedelta(days=config.features.ttl_days)
    print(f"[features] materialising texts up to {end.isoformat()}", flush=True)
    store.materialize(start_date=start.to_pydatetime(), end_date=end.to_pydatetime())


def online_features(config: TuneloopConfig, ids: list[str]) -> pd.DataFrame:
    """The feature service's online features (text and statistics) of ``ids``, one row each in
    order; an unknown id gets a missing text. Materialises first when the online store is empty."""
    definitions = build_definitions(config)
    store = open_store(config, definitions)
    view = store.get_feature_view(definitions.texts_view.name)
    if not view.materialization_intervals:
        materialize(config, store=store)
    service = store.get_feature_service(definitions.feature_service.name)
    rows = [{config.data.id_column: str(key)} for key in ids]
    with _quiet_feast():
        return store.get_online_features(features=service, entity_rows=rows).to_df()
