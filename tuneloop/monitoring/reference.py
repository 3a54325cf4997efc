"""The reference: the monitored version's own training frame (its ``tuneloop.dataset_uri`` lineage
tag), sampled and given the statistics and predicted labels the drift report compares."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.errors import DataError, RegistryError
from tuneloop.monitoring.common import REFERENCE_SEED, STAGE, MonitoringError
from tuneloop.monitoring.window import with_statistics
from tuneloop.privacy import texts_as_logged
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
)
from tuneloop.prediction_log import (
    TEXT,
)

# --------------------------------------------------------------------------------------------
# The reference


@dataclass
class Reference:
    """The reference frame (text, statistics, predicted label) and where it came from."""

    frame: pd.DataFrame
    uri: str
    predictions: str
    rows_available: int
    version_tags: dict[str, str] = field(default_factory=dict)


def monitored_version(config: TuneloopConfig) -> str | None:
    """The version the server answers with: ``deployment.model_version``, else the champion."""
    from tuneloop import registry

    if config.deployment.model_version:
        return str(config.deployment.model_version)
    return registry.alias_version(config, registry.CHAMPION)


def _version_tags(config: TuneloopConfig, version: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    from tuneloop import registry

    mlflow = registry.client(config)
    try:  # an outage raises ServiceUnavailableError (the monitor run is retried), never a verdict
        model_version = registry.call(config, f"reading version {version}", mlflow.get_model_version,
                                      config.registry.model_name, version)
    except MlflowException as error:
        raise RegistryError(
            f"cannot read version {version} of {config.registry.model_name!r} from the registry: {error}",
            stage=STAGE,
        ) from error
    return dict(model_version.tags or {})


def reference_cache_dir(config: TuneloopConfig, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.registry.model_name)
    return Path(config.state_dir) / "monitoring" / "reference" / safe / str(version)


def load_reference(config: TuneloopConfig, version: str) -> Reference:
    """The training frame of ``version`` through its ``tuneloop.dataset_uri`` lineage tag.

    Raises:
        RegistryError: the version has no lineage tag, or nothing is stored where it points.
        ServiceUnavailableError: MLflow or the object store stayed unreachable.
        DataError: the frame is not readable Parquet.
    """
    from tuneloop.registry import TAG_PREFIX

    tags = _version_tags(config, version)
    uri = tags.get(f"{TAG_PREFIX}dataset_uri", "")
    if not uri:
        raise RegistryError(
            f"version {version} of {config.registry.model_name!r} has no {TAG_PREFIX}dataset_uri lineage tag: "
            f"its training frame, the drift reference, is unknown (was it registered by tuneloop?)",
            stage=STAGE,
        )
    cache = reference_cache_dir(config, version)
    target = cache / "dataset.parquet"
    if not target.is_file():  # a per-pod cache: the frame itself lives in the run's artifact store
        import shutil
        import tempfile

        from tuneloop.registry import download_artifact

        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            local = download_artifact(config, uri, scratch, what=f"the training frame of version {version}")
            local = local / "dataset.parquet" if local.is_dir() else local
            shutil.move(str(local), target)
    try:
        frame = pd.read_parquet(target)
    except Exception as error:
        raise DataError(f"the training frame of version {version} ({target}) is not readable Parquet: {error}",
                        stage=STAGE, path=str(target)) from error
    return Reference(frame=frame, uri=uri, predictions=config.monitoring.reference_predictions,
                     rows_available=len(frame), version_tags=tags)


def prepare_reference(config: TuneloopConfig, reference: Reference, version: str | None) -> pd.DataFrame:
    """Text, statistics and predicted label of the (sampled) reference frame."""
    data = config.data
    frame = reference.frame
    text_column = data.text_column if data.text_column in frame.columns else TEXT
    if text_column not in frame.columns:
        raise MonitoringError(f"the reference frame {reference.uri} has no text column {data.text_column!r}",
                              stage=STAGE, path=reference.uri, field=data.text_column)
    limit = config.monitoring.reference_max_rows
    if len(frame) > limit:
        frame = frame.sample(limit, random_state=REFERENCE_SEED).sort_index()
    frame = frame.rename(columns={text_column: TEXT}) if text_column != TEXT else frame
    frame = frame[frame[TEXT].notna()].reset_index(drop=True)
    frame = with_statistics(frame, TEXT)
    if reference.predictions == "champion":
        frame[PREDICTION] = champion_predictions(config, version, frame, reference)
    elif PREDICTION in frame.columns:
        frame[PREDICTION] = frame[PREDICTION].astype(str)
    elif data.label_column in frame.columns:
        frame[PREDICTION] = frame[data.label_column].astype(str)
    else:
        raise MonitoringError(f"the reference frame {reference.uri} has no label column {data.label_column!r}",
                              stage=STAGE, path=reference.uri, field=data.label_column)
    # Statistics and predictions above come from the training text; the text itself is compared (and shown
    # in the report) as the log stores served texts.
    return texts_as_logged(frame, TEXT, config.privacy)


def champion_predictions(config: TuneloopConfig, version: str | None, frame: pd.DataFrame,
                         reference: Reference) -> list[str]:
    """The model's predicted labels on the reference texts, cached per version and sample size."""
    from tuneloop import serving

    if version is None:
        raise MonitoringError("reference_predictions: champion needs a model version", stage=STAGE)
    cache = reference_cache_dir(config, version) / f"predictions-{config.monitoring.reference_max_rows}.parquet"
    if cache.is_file():
        cached = pd.read_parquet(cache)
        if len(cached) == len(frame) and cached[TEXT].tolist() == frame[TEXT].tolist():
            return cached[PREDICTION].astype(str).tolist()
    print(f"[monitoring] predicting {len(frame)} reference texts with version {version} (cached afterwards)",
          flush=True)
    _, directory = serving.fetch_model(config, version)
    loaded = serving.load_model(directory, version)
    probabilities = loaded.classifier.predict_proba(frame[TEXT].tolist(), batch_size=serving.INFERENCE_BATCH_SIZE)
    labels = loaded.labels
    predicted = [labels[int(row.argmax())] for row in probabilities]
    cache.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({TEXT: frame[TEXT].tolist(), PREDICTION: predicted}).to_parquet(cache, index=False)
    return predicted
