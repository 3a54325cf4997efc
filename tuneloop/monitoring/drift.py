"""Evidently: the drift preset on the bounded sample (statistics, descriptors, raw text, prediction)
and the classification preset on feedback labels."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.features import STATISTIC_COLUMNS
from tuneloop.monitoring.common import (
    CATEGORICAL_STATISTICS,
    DESCRIPTOR_COLUMNS,
    NUMERICAL_STATISTICS,
    TEXT_METHOD,
    _first_line,
)
from tuneloop.prediction_log import (
    FEEDBACK,
    REQUEST_ID,
    TEXT,
    TIMESTAMP,
    LogRead,
    prediction_log_uri,
    read_log,
)
from tuneloop.prediction_log import (
    LABEL as FEEDBACK_LABEL,
)
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
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
