"""Drift monitoring of served traffic with Evidently, and the loop around it (``tuneloop monitor``).

**Current data** is the prediction log the serving replicas write (:mod:`tuneloop.prediction_log`: a
Hive-partitioned Parquet dataset under ``deployment.prediction_log_uri``, shared by all replicas) over
a window: a duration back from now (``24h``, ``90m``, ``7d``) or the most recent N records (``5000``).
Only the ``date=/hour=`` partitions of the window are listed and opened, newest first for a record
count, and only the columns the report uses are read. A file that cannot be read (corrupt,
truncated, missing a column) is skipped and named in the report; the rest is used. An unreachable
store is an error to retry (exit 75), never "insufficient data".

**Model versions.** Only records of the *monitored version* are analysed: ``deployment.model_version``
when the server is pinned to one, else the ``champion``. Records of every other version (the previous
champion's traffic just after a promotion, a canary) are filtered out, counted per version and named in
the report: their predictions come from another model, so comparing them with this version's
reference would blame this model for another's behaviour. A count window counts monitored records only.

**Reference** is the monitored version's own training frame: the ``tuneloop.dataset_uri`` lineage tag
of the registry version, downloaded with ``mlflow.artifacts.download_artifacts`` once and cached under
``<state_dir>/monitoring/reference/``. All its rows (every split) are used, sampled down to
``monitoring.reference_max_rows`` (fixed seed); a window beyond ``monitoring.current_max_rows`` records
is sampled down the same way (the drift measures compare distributions, so a large sample suffices).
The reference *predictions* are, by ``monitoring.reference_predictions``:

- ``labels`` (default): the frame's labels. Free and always there; the served predictions then differ
  from them by the model's error rate only, far below the prediction-drift threshold.
- ``champion``: the monitored model's own predictions on the reference texts, computed once per
  version with the serving runtime and cached. Exact, at the price of one pass over the reference.

**The Evidently report** (``Report`` with ``DataDriftPreset``, tests included) covers: the text-statistics
features (:data:`tuneloop.features.STATISTIC_COLUMNS`, recomputed from the text wherever missing),
two descriptors of the raw text (``NonLetterCharacterPercentage``, ``SentenceCount``), the raw text
itself (Evidently's domain-classifier text drift, ``monitoring.text_content_drift``) and the predicted
label. With at least ``monitoring.min_feedback_rows`` feedback labels for the window's records, a
``ClassificationPreset`` on them is added (accuracy, macro-F1, against the version's test metrics).

**Verdict**: ``insufficient_data`` with fewer than ``monitoring.min_rows`` records (or no log, an empty
window, no champion): never ``drift``. Else ``drift`` when any of: the share of drifted feature columns
(the prediction excluded) reaches ``monitoring.drift_share``; a ``monitoring.critical_columns`` column
drifts; the prediction distribution drifts (``monitoring.prediction_drift``); macro-F1 on feedback
falls more than ``monitoring.max_quality_drop_points`` below the version's test macro-F1. Else
``no_drift``.

**Outputs**: a self-contained HTML report (our summary on top of Evidently's) and a JSON summary
(verdict, reasons, per-column scores, windows, files read/skipped, versions filtered, Evidently's own
results under ``evidently``). :func:`monitor` adds the retraining run and the alert it caused.

**Exit codes** of :func:`monitor` (``tuneloop monitor``): ``0`` no drift, ``10`` drift detected,
``11`` insufficient data, ``12`` an alert could not be delivered and waits in the spool (whatever the
verdict; the verdict line says which), and a :class:`~tuneloop.errors.TuneloopError`'s own code for
an error (a failed retraining trigger: 7). The last line printed is always the verdict when one was
reached: ``verdict: no drift``, ``verdict: drift detected`` or ``verdict: insufficient data``.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError, DataError, RegistryError, TuneloopError
from tuneloop.features import STATISTIC_COLUMNS, text_statistics
from tuneloop.prediction_log import (
    FEEDBACK,
    MODEL_VERSION,
    PREDICTED_LABEL as PREDICTION,
    PREDICTIONS,
    REQUEST_ID,
    TEXT,
    TIMESTAMP,
    LABEL as FEEDBACK_LABEL,
    LogRead,
    check_store,
    prediction_log_uri,
    read_log,
)

STAGE = "monitoring"

LOG_COLUMNS = (REQUEST_ID, TIMESTAMP, MODEL_VERSION, TEXT, PREDICTION)
"""Prediction-log columns the drift check needs (the text statistics are read when present)."""

CATEGORICAL_STATISTICS = ("has_url", "has_phone_number")
NUMERICAL_STATISTICS = tuple(name for name in STATISTIC_COLUMNS if name not in CATEGORICAL_STATISTICS)
DESCRIPTOR_COLUMNS = ("non_letter_share", "sentence_count")

DRIFT, NO_DRIFT, INSUFFICIENT_DATA = "drift", "no_drift", "insufficient_data"
VERDICT_LINES = {
    NO_DRIFT: "verdict: no drift",
    DRIFT: "verdict: drift detected",
    INSUFFICIENT_DATA: "verdict: insufficient data",
}
EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_INSUFFICIENT_DATA, EXIT_ALERT_SPOOLED = 0, 10, 11, 12
EXIT_CODES = {NO_DRIFT: EXIT_NO_DRIFT, DRIFT: EXIT_DRIFT, INSUFFICIENT_DATA: EXIT_INSUFFICIENT_DATA}
ALERT_KIND = "drift_detected"
TEXT_METHOD = "abs_text_content_drift"
ALERT_COLUMNS = 6
"""Drifted columns named in an alert's message (the details list them all)."""
REFERENCE_SEED = 0
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class MonitoringError(DataError):
    """The drift check cannot run on what it was given (a reference without texts, ...)."""


# --------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    """A window of the prediction log: the last ``duration`` of time, or the last ``records``."""

    spec: str
    duration: dt.timedelta | None = None
    records: int | None = None

    def describe(self) -> str:
        return f"last {self.records} records" if self.records else f"last {self.spec}"


def parse_window(spec: str | int) -> Window:
    """``24h``, ``90m``, ``7d``, ``2w``, ``3600s`` (a duration) or ``5000`` (a record count).

    Raises:
        ConfigError: anything else, or zero.
    """
    text = str(spec).strip().lower()
    match = re.fullmatch(r"([0-9]+)\s*([smhdw]?)", text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(
            f"invalid window {spec!r}: use a duration like 24h, 90m, 7d or a number of records like 5000",
            stage=STAGE, field="monitoring.window",
        )
    number, unit = int(match.group(1)), match.group(2)
    if not unit:
        return Window(spec=text, records=number)
    return Window(spec=text, duration=dt.timedelta(**{_UNITS[unit]: number}))


# --------------------------------------------------------------------------------------------
# Reading the log


@dataclass
class CurrentData:
    """The monitored version's records in the window, and what was left out."""

    frame: pd.DataFrame
    window: Window
    start: pd.Timestamp | None
    end: pd.Timestamp
    log_uri: str
    files_read: list[str]
    files_skipped: list[dict]
    other_versions: dict[str, int]
    rows_in_window: int


def load_current(config: TuneloopConfig, window: Window, version: str | None, *, now: pd.Timestamp) -> CurrentData:
    """The prediction-log records of ``version`` in ``window`` (oldest first).

    Raises:
        ConfigError: a pod-local log in a cluster, or a bucket that does not exist.
        ServiceUnavailableError: the log's store does not answer.
    """
    uri = prediction_log_uri(config)
    check_store(uri)
    start = now - pd.Timedelta(window.duration) if window.duration else None
    read = read_log(uri, PREDICTIONS, start=start, end=now, last=window.records,
                    columns=[*LOG_COLUMNS, *STATISTIC_COLUMNS], required=LOG_COLUMNS,
                    version=None if version is None else str(version))
    frame = read.frame
    rows_in_window = len(frame) + sum(read.other_versions.values())
    if not frame.empty:
        frame = frame.copy()
        frame[MODEL_VERSION] = frame[MODEL_VERSION].astype(str)
        frame = frame[frame[TIMESTAMP].notna()].sort_values(TIMESTAMP, kind="stable")
        if window.records:
            frame = frame.tail(window.records)
    return CurrentData(
        frame=frame.reset_index(drop=True), window=window, start=start, end=now, log_uri=uri,
        files_read=read.files_read, files_skipped=read.files_skipped, other_versions=read.other_versions,
        rows_in_window=rows_in_window,
    )


def with_statistics(frame: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """``frame`` with every text-statistics column; missing ones computed from ``text_column``."""
    missing = [name for name in STATISTIC_COLUMNS if name not in frame.columns]
    frame = frame.copy()
    if missing:
        statistics = text_statistics(frame[text_column])
        for name in missing:
            frame[name] = statistics[name].to_numpy()
    return frame.astype({name: dtype for name, dtype in STATISTIC_COLUMNS.items()})


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
    return frame


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


# --------------------------------------------------------------------------------------------
# The drift report


@dataclass
class DriftReport:
    """The outcome of :func:`check_drift`: verdict, the JSON summary, where the files are."""

    verdict: str
    summary: dict
    html_path: Path
    json_path: Path

    @property
    def drift(self) -> bool:
        return self.verdict == DRIFT

    @property
    def report_id(self) -> str:
        return self.summary["report_id"]

    @property
    def location(self) -> str:
        return self.summary.get("report_uri") or str(self.html_path)

    @property
    def verdict_line(self) -> str:
        return VERDICT_LINES[self.verdict]

    def update(self, **sections: Any) -> None:
        """Add sections (``retraining``, ``alert``) to the summary and rewrite the JSON file."""
        self.summary.update(sections)
        write_json(self.json_path, self.summary)


def reports_dir(config: TuneloopConfig) -> Path:
    """Where :func:`check_drift` writes when not given paths: ``<state_dir>/monitoring/reports``."""
    return Path(config.state_dir) / "monitoring" / "reports"


def check_drift(
    config: TuneloopConfig,
    window: str | Window | None = None,
    *,
    html_path: str | Path | None = None,
    json_path: str | Path | None = None,
    report_uri: str = "",
    reference: pd.DataFrame | None = None,
    model_version: str | None = None,
    now: dt.datetime | None = None,
) -> DriftReport:
    """Compare the window's served traffic with the reference and decide.

    Args:
        window: ``24h``/``5000``...; None means ``monitoring.window``.
        html_path, json_path: where to write (KFP artifact paths); default
            ``<state_dir>/monitoring/reports/<report id>/report.{html,json}``.
        report_uri: where readers find the report (a KFP artifact URI), for alerts.
        reference: a reference frame to use instead of the registry's (tests, benchmarks).
        model_version: the version to monitor instead of :func:`monitored_version`.
        now: the end of the window (UTC), for tests.

    Raises:
        ConfigError: a bad window or an unknown critical column.
        RegistryError: the registry is unreachable or the version has no training frame.
    """
    monitoring = config.monitoring
    window = window if isinstance(window, Window) else parse_window(window or monitoring.window)
    _check_critical_columns(config)
    now_ts = pd.Timestamp(now or dt.datetime.now(dt.timezone.utc))
    now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts.tz_convert("UTC")
    report_id = f"drift-{now_ts:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    directory = reports_dir(config) / report_id
    html_path = Path(html_path) if html_path else directory / "report.html"
    json_path = Path(json_path) if json_path else directory / "report.json"

    version = model_version or monitored_version(config)
    current = load_current(config, window, version, now=now_ts)
    summary: dict[str, Any] = {
        "report_id": report_id,
        "created": now_ts.isoformat(),
        "project": config.name,
        "model_name": config.registry.model_name,
        "model_version": version,
        "verdict": None,
        "drift": False,
        "reasons": [],
        "window": {
            "spec": window.spec, "description": window.describe(),
            "start": current.start.isoformat() if current.start is not None else None,
            "end": current.end.isoformat(),
            "first_record": _iso(current.frame[TIMESTAMP].min()) if len(current.frame) else None,
            "last_record": _iso(current.frame[TIMESTAMP].max()) if len(current.frame) else None,
        },
        "log": {
            "uri": current.log_uri,
            "files_read": len(current.files_read),
            "files_skipped": current.files_skipped,
            "rows_in_window": current.rows_in_window,
            "other_versions": current.other_versions,
        },
        "rows": {"current": len(current.frame), "reference": 0, "min_rows": monitoring.min_rows},
        "thresholds": {
            "drift_share": monitoring.drift_share, "critical_columns": list(monitoring.critical_columns),
            "prediction_drift": monitoring.prediction_drift, "prediction_method": monitoring.prediction_method,
            "prediction_threshold": monitoring.prediction_threshold, "stattest": monitoring.stattest,
            "stattest_threshold": monitoring.stattest_threshold,
            "max_quality_drop_points": monitoring.max_quality_drop_points,
        },
        "reference": None,
        "columns": [],
        "drift_share": None,
        "drifted_columns": [],
        "prediction": None,
        "quality": None,
        "report_html": str(html_path),
        "report_json": str(json_path),
        "report_uri": report_uri or str(html_path),
        "retraining": None,
        "alert": None,
    }
    for skipped in current.files_skipped:
        print(f"[monitoring] skipped unreadable log file {skipped['path']}: {skipped['reason']}", flush=True)

    reason = _insufficient(config, version, current)
    drift_snapshot = quality_snapshot = None
    if reason is None:
        ref = Reference(frame=reference, uri="(given)", predictions="given", rows_available=len(reference)) \
            if reference is not None else load_reference(config, version)
        reference_frame = prepare_reference(config, ref, version)
        current_frame = current.frame
        if len(current_frame) > monitoring.current_max_rows:
            current_frame = current_frame.sample(monitoring.current_max_rows, random_state=REFERENCE_SEED)
            summary["rows"]["analysed"] = len(current_frame)
        current_frame = current_frame.assign(**{TEXT: current_frame[TEXT].fillna("").astype(str)})
        current_frame = with_statistics(current_frame, TEXT)
        current_frame[PREDICTION] = current_frame[PREDICTION].astype(str)
        if reference_frame.empty:
            raise MonitoringError(f"the reference frame {ref.uri} holds no rows with text", stage=STAGE,
                                  path=ref.uri)
        summary["reference"] = {"uri": ref.uri, "predictions": ref.predictions, "rows": len(reference_frame),
                                "rows_available": ref.rows_available}
        summary["rows"]["reference"] = len(reference_frame)
        try:
            drift_snapshot, columns = run_drift_report(config, reference_frame, current_frame)
        except TuneloopError:
            raise
        except Exception as error:  # Evidently's own failure on odd data: one clean error
            raise MonitoringError(f"Evidently could not compute the drift report: {type(error).__name__}: {error}",
                                  stage=STAGE) from error
        summary["columns"] = columns
        summary["prediction"] = _prediction_summary(columns, reference_frame, current_frame)
        quality, quality_snapshot = feedback_quality(config, current.frame, ref.version_tags)
        summary["quality"] = quality
        verdict, reasons = decide(config, columns, quality)
        features = [c for c in columns if c["kind"] != "prediction"]
        drifted = [c for c in features if c["drifted"]]
        summary["drift_share"] = len(drifted) / len(features) if features else 0.0
        summary["drifted_columns"] = [c["column"] for c in columns if c["drifted"]]
        summary["evidently"] = _jsonable(drift_snapshot.dict())
    else:
        verdict, reasons = INSUFFICIENT_DATA, [reason]
    summary["verdict"] = verdict
    summary["drift"] = verdict == DRIFT
    summary["reasons"] = reasons
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(summary, drift_snapshot, quality_snapshot), encoding="utf-8")
    write_json(json_path, summary)
    return DriftReport(verdict=verdict, summary=summary, html_path=html_path, json_path=json_path)


def _insufficient(config: TuneloopConfig, version: str | None, current: CurrentData) -> str | None:
    """Why there is too little data to decide, or None."""
    minimum = config.monitoring.min_rows
    if version is None:
        return (f"no champion version of {config.registry.model_name!r} in the registry (and no "
                f"deployment.model_version): nothing to compare the traffic with")
    if not current.files_read and not current.files_skipped:
        return f"no prediction log files under {current.log_uri} in the window ({current.window.describe()})"
    if not current.files_read:
        return f"no readable prediction log file under {current.log_uri}: {len(current.files_skipped)} skipped"
    rows = len(current.frame)
    if rows == 0 and current.rows_in_window == 0:
        return f"the window ({current.window.describe()}) holds no records in {current.log_uri}"
    if rows < minimum:
        others = ""
        if current.other_versions:
            listed = ", ".join(f"version {v}: {n}" for v, n in sorted(current.other_versions.items()))
            others = f"; records of other versions were left out ({listed})"
        return (f"{rows} records of version {version} in the window ({current.window.describe()}), "
                f"fewer than monitoring.min_rows={minimum}{others}")
    return None


def known_columns() -> list[str]:
    """Every column the drift report covers (what ``monitoring.critical_columns`` may name)."""
    return [*STATISTIC_COLUMNS, *DESCRIPTOR_COLUMNS, TEXT, PREDICTION]


def _check_critical_columns(config: TuneloopConfig) -> None:
    unknown = [c for c in config.monitoring.critical_columns if c not in known_columns()]
    if unknown:
        raise ConfigError(
            f"monitoring.critical_columns: unknown columns {unknown}; known: {', '.join(known_columns())}",
            stage=STAGE, field="monitoring.critical_columns",
        )


# --------------------------------------------------------------------------------------------
# Evidently


def _column_kinds(config: TuneloopConfig) -> dict[str, str]:
    kinds = {name: "statistic" for name in STATISTIC_COLUMNS}
    kinds.update({name: "descriptor" for name in DESCRIPTOR_COLUMNS})
    if config.monitoring.text_content_drift:
        kinds[TEXT] = "text"
    kinds[PREDICTION] = "prediction"
    return kinds


def _methods(config: TuneloopConfig, kinds: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """Per-column Evidently method and threshold from the config (absent: Evidently's default)."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    monitoring = config.monitoring
    types = {"text": ColumnType.Text}
    methods: dict[str, str] = {PREDICTION: monitoring.prediction_method}
    thresholds: dict[str, float] = {PREDICTION: monitoring.prediction_threshold}
    for column, kind in kinds.items():
        if kind == "prediction":
            continue
        if kind == "text" and not monitoring.stattest:
            # Evidently's pick for small references (perc_text_content_drift) fits 1000 permuted
            # classifiers; the absolute ROC AUC of one domain classifier decides as well, far faster.
            methods[column] = TEXT_METHOD
        column_type = types.get(kind) or (
            ColumnType.Categorical if column in CATEGORICAL_STATISTICS else ColumnType.Numerical)
        if monitoring.stattest:
            try:
                get_registered_stattest(monitoring.stattest, column_type)
                methods[column] = monitoring.stattest
            except ValueError:  # not defined for this column type: Evidently's default
                pass
        if monitoring.stattest_threshold is not None and (column in methods or not monitoring.stattest):
            thresholds[column] = monitoring.stattest_threshold
    return methods, thresholds


def run_drift_report(config: TuneloopConfig, reference: pd.DataFrame, current: pd.DataFrame):
    """Run Evidently's drift preset; return the snapshot and one result per column:
    ``{column, kind, method, threshold, score, drifted}``."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import NonLetterCharacterPercentage, SentenceCount
    from evidently.presets import DataDriftPreset

    kinds = _column_kinds(config)
    definition = DataDefinition(
        numerical_columns=list(NUMERICAL_STATISTICS),
        categorical_columns=[*CATEGORICAL_STATISTICS, PREDICTION],
        text_columns=[TEXT],
    )
    base_columns = [TEXT, *STATISTIC_COLUMNS, PREDICTION]
    methods, thresholds = _methods(config, kinds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = [
            Dataset.from_pandas(
                frame[base_columns].reset_index(drop=True), data_definition=definition,
                descriptors=[NonLetterCharacterPercentage(TEXT, alias="non_letter_share"),
                             SentenceCount(TEXT, alias="sentence_count")],
            )
            for frame in (current, reference)
        ]
        report = Report([DataDriftPreset(columns=list(kinds), drift_share=config.monitoring.drift_share,
                                         per_column_method=methods, per_column_threshold=thresholds)],
                        include_tests=True)
        snapshot = report.run(datasets[0], datasets[1])
        results = snapshot.dict()
    return snapshot, _column_results(results, kinds)


def _column_results(results: dict, kinds: dict[str, str]) -> list[dict]:
    drifted_by_metric = {}
    for test in results.get("tests", []):
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id and test.get("id") == "drift":
            drifted_by_metric[metric_id] = test.get("status") == "FAIL"
    columns = []
    for metric in results.get("metrics", []):
        config = metric.get("config") or {}
        if config.get("type") != "evidently:metric_v2:ValueDrift" or config.get("column") not in kinds:
            continue
        score = float(metric["value"])
        columns.append({
            "column": config["column"],
            "kind": kinds[config["column"]],
            "method": config.get("method"),
            "threshold": config.get("threshold"),
            "score": score,
            "drifted": bool(drifted_by_metric.get(metric.get("id"), False)),
        })
    order = list(kinds)
    return sorted(columns, key=lambda c: order.index(c["column"]))


def _prediction_summary(columns: list[dict], reference: pd.DataFrame, current: pd.DataFrame) -> dict:
    result = next((c for c in columns if c["kind"] == "prediction"), {})
    share = lambda frame: {str(k): round(float(v), 4) for k, v in  # noqa: E731
                           frame[PREDICTION].value_counts(normalize=True).sort_index().items()}
    return {**result, "reference_distribution": share(reference), "current_distribution": share(current)}


def feedback_quality(config: TuneloopConfig, current: pd.DataFrame, version_tags: dict[str, str]):
    """Accuracy and macro-F1 on the window's records that received a feedback label (None when
    fewer than ``monitoring.min_feedback_rows``), and the Evidently classification snapshot."""
    from tuneloop.registry import TAG_PREFIX

    served = current[TIMESTAMP] if TIMESTAMP in current.columns and not current.empty else None
    read = read_feedback_for(config, served)
    for skipped in read.files_skipped:
        print(f"[monitoring] skipped unreadable feedback file {skipped['path']}: {skipped['reason']}", flush=True)
    feedback = read.frame
    if feedback.empty or current.empty:
        return ({"rows": 0, "files_skipped": read.files_skipped} if read.files_skipped else None), None
    if TIMESTAMP in feedback.columns:
        feedback = feedback.sort_values(TIMESTAMP, kind="stable")
    feedback = feedback.drop_duplicates(REQUEST_ID, keep="last")[[REQUEST_ID, FEEDBACK_LABEL]]
    labelled = current[[REQUEST_ID, PREDICTION]].merge(feedback, on=REQUEST_ID, how="inner")
    labelled[FEEDBACK_LABEL] = labelled[FEEDBACK_LABEL].astype(str)
    labelled[PREDICTION] = labelled[PREDICTION].astype(str)
    summary: dict[str, Any] = {"rows": len(labelled), "min_rows": config.monitoring.min_feedback_rows,
                               "files_skipped": read.files_skipped}
    if len(labelled) < config.monitoring.min_feedback_rows:
        return summary, None
    from sklearn.metrics import accuracy_score, f1_score

    labels = sorted(set(config.data.classes) | set(labelled[FEEDBACK_LABEL]) | set(labelled[PREDICTION]))
    summary["accuracy"] = float(accuracy_score(labelled[FEEDBACK_LABEL], labelled[PREDICTION]))
    summary["macro_f1"] = float(f1_score(labelled[FEEDBACK_LABEL], labelled[PREDICTION], labels=labels,
                                         average="macro", zero_division=0))
    try:
        champion = json.loads(version_tags.get(f"{TAG_PREFIX}metrics", "{}") or "{}")
    except json.JSONDecodeError:
        champion = {}
    if "macro_f1" in champion:
        summary["version_test_macro_f1"] = float(champion["macro_f1"])
        summary["macro_f1_drop_points"] = round((float(champion["macro_f1"]) - summary["macro_f1"]) * 100, 3)
    snapshot = None
    try:
        from evidently import DataDefinition, Dataset, MulticlassClassification, Report
        from evidently.presets import ClassificationPreset

        definition = DataDefinition(
            categorical_columns=[FEEDBACK_LABEL, PREDICTION],
            classification=[MulticlassClassification(target=FEEDBACK_LABEL, prediction_labels=PREDICTION)],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = Dataset.from_pandas(labelled[[FEEDBACK_LABEL, PREDICTION]], data_definition=definition)
            snapshot = Report([ClassificationPreset()]).run(dataset, None)
    except Exception as error:  # the numbers above stand; only the quality section of the HTML is lost
        summary["report_error"] = _first_line(f"{type(error).__name__}: {error}")
    return summary, snapshot


def read_feedback_for(config: TuneloopConfig, served: pd.Series | None) -> LogRead:
    """The feedback labels of predictions served between the first and last of ``served`` (their
    partitions only; all feedback when None)."""
    start = end = None
    if served is not None and served.notna().any():
        # served_at is the request id's time, to the millisecond
        start, end = served.min().floor("ms").to_pydatetime(), served.max().to_pydatetime()
    return read_log(prediction_log_uri(config), FEEDBACK, start=start, end=end,
                    columns=[REQUEST_ID, TIMESTAMP, FEEDBACK_LABEL], required=(REQUEST_ID, FEEDBACK_LABEL))


def decide(config: TuneloopConfig, columns: list[dict], quality: dict | None) -> tuple[str, list[str]]:
    """The verdict (``drift`` or ``no_drift``) and its reasons, from the config's thresholds."""
    monitoring = config.monitoring
    features = [c for c in columns if c["kind"] != "prediction"]
    drifted = [c for c in features if c["drifted"]]
    share = len(drifted) / len(features) if features else 0.0
    reasons = []
    if features and share >= monitoring.drift_share:
        reasons.append(f"{len(drifted)} of {len(features)} feature columns drifted ({share:.0%}, threshold "
                       f"{monitoring.drift_share:.0%}): " + ", ".join(_describe(c) for c in drifted))
    for column in columns:
        if column["column"] in monitoring.critical_columns and column["drifted"]:
            reasons.append(f"critical column {_describe(column)} drifted")
    prediction = next((c for c in columns if c["kind"] == "prediction"), None)
    if monitoring.prediction_drift and prediction is not None and prediction["drifted"]:
        reasons.append(f"prediction distribution drifted: {_describe(prediction)}")
    limit = monitoring.max_quality_drop_points
    if limit is not None and quality and quality.get("macro_f1_drop_points") is not None \
            and quality["macro_f1_drop_points"] > limit:
        reasons.append(f"macro-F1 on {quality['rows']} feedback labels is {quality['macro_f1']:.4f}, "
                       f"{quality['macro_f1_drop_points']:.2f} points below the version's test macro-F1 "
                       f"{quality['version_test_macro_f1']:.4f} (limit {limit:g})")
    if reasons:
        return DRIFT, reasons
    note = (f"{len(drifted)} of {len(features)} feature columns drifted ({share:.0%}, threshold "
            f"{monitoring.drift_share:.0%})")
    if drifted:
        note += ": " + ", ".join(_describe(c) for c in drifted)
    return NO_DRIFT, [note]


def _describe(column: dict) -> str:
    return f"{column['column']} ({column['method']} {column['score']:.3g}, threshold {column['threshold']:.3g})"


# --------------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, summary: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(summary), indent=2, default=str), encoding="utf-8")


def read_report(path: str | Path) -> dict:
    """Read a report JSON written by :func:`check_drift`.

    Raises:
        DataError: missing or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"drift report {path} is not readable JSON: {error}", stage=STAGE, path=str(path)) from error


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.isoformat()
    return value


def _iso(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else pd.Timestamp(value).isoformat()


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def render_html(summary: dict, drift_snapshot=None, quality_snapshot=None) -> str:
    """One self-contained HTML page: the verdict summary on top of Evidently's drift report (and
    its classification report on feedback labels, when there is one)."""
    header = _summary_html(summary)
    if drift_snapshot is None:
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tuneloop drift report "
                f"{html.escape(summary['report_id'])}</title></head><body>{header}</body></html>")
    body = _evidently_html(drift_snapshot, quality_snapshot)
    match = re.search(r"<body[^>]*>", body)
    if match is None:
        return header + body
    return body[: match.end()] + header + body[match.end():]


def _evidently_html(drift_snapshot, quality_snapshot) -> str:
    """Evidently's widgets of both snapshots in one page (its standalone renderer)."""
    try:
        from evidently.core.metric_types import render_widgets
        from evidently.legacy.renderers.html_widgets import group_widget

        widgets = [group_widget(title="Data and prediction drift", widgets=drift_snapshot._widgets)]
        widgets += list(drift_snapshot._tests_widgets)
        if quality_snapshot is not None:
            widgets.append(group_widget(title="Classification quality on feedback labels",
                                        widgets=quality_snapshot._widgets))
        return render_widgets(widgets, as_iframe=False)
    except Exception:  # Evidently internals moved: its own page of the drift report only
        return drift_snapshot.get_html_str(as_iframe=False)


def _summary_html(summary: dict) -> str:
    esc = lambda value: html.escape(str(value))  # noqa: E731
    colour = {DRIFT: "#b3261e", NO_DRIFT: "#1e7b34", INSUFFICIENT_DATA: "#8a6d00"}[summary["verdict"]]
    rows = [
        ("model", f"{summary['model_name']} version {summary['model_version']}"),
        ("window", f"{summary['window']['description']} (until {summary['window']['end']})"),
        ("records", f"{summary['rows']['current']} current (min {summary['rows']['min_rows']}), "
                    f"{summary['rows']['reference']} reference"),
        ("prediction log", summary["log"]["uri"]),
    ]
    if summary.get("reference"):
        reference = summary["reference"]
        rows.append(("reference", f"{reference['uri']} (predictions: {reference['predictions']})"))
    others = summary["log"]["other_versions"]
    if others:
        rows.append(("left out", ", ".join(f"{n} records of version {v}" for v, n in sorted(others.items()))))
    table = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{esc(k)}</th><td>{esc(v)}</td></tr>"
                    for k, v in rows)
    reasons = "".join(f"<li>{esc(reason)}</li>" for reason in summary["reasons"])
    parts = [
        "<section id='tuneloop-summary' style='font-family:sans-serif;margin:1em 2em;padding:1em;"
        "border:1px solid #ccc;border-radius:6px'>",
        f"<h1 style='margin-top:0'>tuneloop drift report <small>{esc(summary['report_id'])}</small></h1>",
        f"<p style='font-size:1.3em;color:{colour};font-weight:bold'>"
        f"{esc(VERDICT_LINES[summary['verdict']])}</p><ul>{reasons}</ul><table>{table}</table>",
    ]
    if summary["columns"]:
        cells = "".join(
            f"<tr><td>{esc(c['column'])}</td><td>{esc(c['kind'])}</td><td>{esc(c['method'])}</td>"
            f"<td>{c['score']:.4g}</td><td>{esc(c['threshold'])}</td>"
            + ("<td style='color:#b3261e'>drift</td></tr>" if c["drifted"] else
               "<td style='color:#1e7b34'>ok</td></tr>")
            for c in summary["columns"])
        parts.append("<h2>Columns</h2><table border='1' cellpadding='4' style='border-collapse:collapse'>"
                     "<tr><th>column</th><th>kind</th><th>method</th><th>score</th><th>threshold</th>"
                     f"<th>drift</th></tr>{cells}</table>")
    quality = summary.get("quality")
    if quality and "macro_f1" in quality:
        parts.append(f"<h2>Quality on feedback labels</h2><p>{quality['rows']} labelled records: accuracy "
                     f"{quality['accuracy']:.4f}, macro-F1 {quality['macro_f1']:.4f}"
                     + (f" (version's test macro-F1 {quality['version_test_macro_f1']:.4f})"
                        if "version_test_macro_f1" in quality else "") + "</p>")
    skipped = summary["log"]["files_skipped"] + ((quality or {}).get("files_skipped") or [])
    if skipped:
        items = "".join(f"<li><code>{esc(s['path'])}</code>: {esc(s['reason'])}</li>" for s in skipped)
        parts.append(f"<h2>Skipped files ({len(skipped)})</h2><ul>{items}</ul>")
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# The loop: check, trigger, alert (``tuneloop monitor``)


@dataclass
class MonitorOutcome:
    """What :func:`monitor` did; ``exit_code`` is the CLI's."""

    report: DriftReport
    exit_code: int
    trigger: Any = None
    alert: dict | None = None
    spool_pending: int = 0
    error: TuneloopError | None = None

    @property
    def verdict(self) -> str:
        return self.report.verdict


def monitor(
    config: TuneloopConfig,
    window: str | None = None,
    *,
    launcher=None,
    retry=None,
    reference: pd.DataFrame | None = None,
    model_version: str | None = None,
    now: dt.datetime | None = None,
) -> MonitorOutcome:
    """One monitoring pass, the body of ``tuneloop monitor``: check drift; on drift start a
    retraining run (cooldown-guarded) and send an alert naming what drifted, by how much, for which
    version, where the report is, and which run started. Alerts spooled by earlier runs are re-sent
    (oldest first, before this run's alert), so a webhook outage costs one retry sequence per run.

    Prints a line per step; the last line is the verdict (``verdict: ...``).

    Args:
        window: ``24h``, ``5000``...; None means ``monitoring.window``.
        launcher, retry: injectable retraining launcher and webhook retry policy (tests).
        reference, model_version, now: see :func:`check_drift`.

    Returns:
        The outcome; its ``exit_code``: 0 no drift, 10 drift, 11 insufficient data, 12 an alert is
        spooled, or the error's own code when the retraining trigger failed (the verdict still
        printed last).

    Raises:
        TuneloopError: no verdict could be reached (bad config, registry unreachable, ...).
    """
    from tuneloop import alerts, retraining

    report = check_drift(config, window, reference=reference, model_version=model_version, now=now)
    summary = report.summary
    print(f"[monitoring] {summary['rows']['current']} records of version {summary['model_version']} "
          f"({summary['window']['description']}); report {report.html_path}", flush=True)
    for reason in report.summary["reasons"]:
        print(f"[monitoring] {reason}", flush=True)
    trigger = alert = error = None
    if report.drift:
        request = retraining.RetrainingRequest(report_id=report.report_id, report_path=str(report.json_path),
                                               model_version=str(summary["model_version"]),
                                               reasons=tuple(summary["reasons"]))
        try:
            trigger = retraining.trigger_retraining(config, request, launcher=launcher, now=now)
            print(f"[monitoring] retraining: {trigger.status}: {trigger.message}", flush=True)
            report.update(retraining=trigger.to_dict())
        except TuneloopError as failure:
            error = failure
            report.update(retraining={"status": "failed", "error": str(failure)})
        alert = send_drift_alert(config, report, retry=retry)  # re-sends spooled alerts first
    else:
        alerts.resend_spooled(config, retry=retry)
    pending = alerts.spool_size(config)
    exit_code = EXIT_CODES[report.verdict]
    if pending:
        exit_code = EXIT_ALERT_SPOOLED
        print(f"[monitoring] {pending} alert(s) could not be delivered and wait in {alerts.spool_path(config)}; "
              f"they are re-sent on the next run", flush=True)
    if error is not None:
        exit_code = error.exit_code
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    print(report.verdict_line, flush=True)
    return MonitorOutcome(report=report, exit_code=exit_code, trigger=trigger, alert=alert, spool_pending=pending,
                          error=error)


def drift_alert(report_summary: dict) -> tuple[str, dict]:
    """The message and details of a drift alert: what drifted and by how much, which version,
    where the report is, which retraining run started."""
    summary = report_summary
    retraining = summary.get("retraining") or {}
    drifted = [c for c in summary.get("columns", []) if c["drifted"]]
    what = "; ".join(_describe(c) for c in drifted[:ALERT_COLUMNS]) or "; ".join(summary.get("reasons", []))
    if len(drifted) > ALERT_COLUMNS:
        what += f"; and {len(drifted) - ALERT_COLUMNS} more columns (all in details and the report)"
    run = ""
    if retraining.get("status") in ("started", "cooldown", "duplicate") and retraining.get("run_id"):
        run = f"; retraining {retraining['status']}: run {retraining['run_id']}"
    elif retraining.get("status") == "failed":
        run = f"; retraining FAILED to start: {retraining.get('error')}"
    elif retraining.get("status"):
        run = f"; retraining {retraining['status']}"
    share = summary.get("drift_share")
    message = (f"drift detected on {summary['model_name']} version {summary['model_version']} "
               f"({summary['rows']['current']} records, {summary['window']['description']}"
               + (f", {share:.0%} of feature columns drifted" if share is not None else "")
               + f"): {what}; report {summary.get('report_uri') or summary.get('report_html')}{run}")
    details = {
        "report_id": summary["report_id"],
        "report": summary.get("report_uri") or summary.get("report_html"),
        "report_json": summary.get("report_json"),
        "model_name": summary["model_name"],
        "model_version": summary["model_version"],
        "window": summary["window"],
        "rows": summary["rows"],
        "drift_share": share,
        "drifted_columns": [{k: c[k] for k in ("column", "kind", "method", "score", "threshold")} for c in drifted],
        "prediction": summary.get("prediction"),
        "reasons": summary.get("reasons", []),
        "retraining": retraining or None,
    }
    return message, details


def send_drift_alert(config: TuneloopConfig, report: DriftReport | dict, *, retry=None) -> dict:
    """Send the drift alert of a report (and record its delivery in the report JSON when it has one)."""
    from tuneloop import alerts

    summary = report.summary if isinstance(report, DriftReport) else report
    message, details = drift_alert(summary)
    alert = alerts.send_alert(config, ALERT_KIND, message, details, retry=retry)
    record = {"id": alert["id"], "webhook": alert["webhook"], "spooled": alert["spooled"]}
    if isinstance(report, DriftReport):
        report.update(alert=record)
    return alert
