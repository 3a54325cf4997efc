"""The training set: each label joined point-in-time to its text through Feast, with splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import SPLIT_COLUMN, SPLITS, assign_split, read_table, require_columns
from tuneloop.errors import DataError
from tuneloop.features.definitions import (
    EVENT_TIMESTAMP,
    STAGE,
    build_definitions,
    prepare_texts,
    quiet_feast,
    to_utc,
)
from tuneloop.features.statistics import STATISTIC_COLUMNS
from tuneloop.privacy import private_training_frame
from tuneloop.features.store import applies_on_read, open_store, outages_as_unavailable


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
    path = data.labels
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
        print(f"[features] dropped {int(unlabelled.sum())} rows of {path} with no label", flush=True)
        frame = frame[~unlabelled]
    labels = pd.DataFrame(
        {
            data.id_column: frame[data.id_column].astype(str),
            EVENT_TIMESTAMP: to_utc(frame[data.timestamp_column], column=data.timestamp_column, path=path),
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
    print(f"[features] {len(labels)} labels from {data.labels}", flush=True)
    if labels.empty:
        raise DataError(f"labels file {data.labels} holds no rows", stage=STAGE, path=str(data.labels))

    with outages_as_unavailable(config, "building the training set"):
        definitions = build_definitions(config, prepare_texts(config) if applies_on_read(config) else None)
        store = open_store(config, definitions)
        service = store.get_feature_service(definitions.feature_service.name)
        print(f"[features] point-in-time join through feature service {service.name!r}", flush=True)
        with quiet_feast():
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
    dataset = private_training_frame(dataset, config)  # erased rows out; privacy.training (recorded in attrs)

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

