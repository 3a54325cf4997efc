"""The verdict: ``insufficient_data`` below ``monitoring.min_rows``, else ``drift`` or ``no_drift``.

**The rule** (:func:`decide`) is ``drift`` when any signal fires:

1. the share of drifted feature columns (statistics, descriptors, raw text; the prediction and the
   embedding signal excluded) reaches ``monitoring.drift_share``;
2. a ``monitoring.critical_columns`` column drifts;
3. the prediction distribution drifts (``monitoring.prediction_drift``);
4. macro-F1 on feedback labels falls more than ``monitoring.max_quality_drop_points`` below the
   version's test macro-F1;
5. the embedding signal fires (``monitoring.embedding_drift``): a k-NN domain classifier on the
   served model's sentence embeddings scores above its threshold, calibrated by permutation on the
   reference to ``monitoring.embedding_false_alarm_rate`` (:mod:`.embeddings`).

Signals 1-4 are Evidently's (per column: decided on the whole window where the method is binned,
else on the sample, :mod:`.histograms`); signal 5 catches a small campaign that moves no column's
marginal distribution far enough. The false alarms of the combined rule are at most those of 1-4
(unchanged) plus the embedding rate. ``evidently_verdict`` in the report is 1-4 alone: today's rule.
"""

from __future__ import annotations

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError
from tuneloop.features import STATISTIC_COLUMNS
from tuneloop.monitoring.common import (
    DESCRIPTOR_COLUMNS,
    DRIFT,
    NO_DRIFT,
    STAGE,
    _describe,
)
from tuneloop.monitoring.scan import CurrentData
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
)
from tuneloop.prediction_log import (
    TEXT,
)


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
    rows = current.rows
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


def decide(config: TuneloopConfig, columns: list[dict], quality: dict | None,
           embedding: dict | None = None) -> tuple[str, list[str]]:
    """The verdict (``drift`` or ``no_drift``) and its reasons, by the rule in the module docstring."""
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
    if embedding is not None and embedding.get("drifted"):
        reasons.append(embedding_reason(embedding))
    if reasons:
        return DRIFT, reasons
    note = (f"{len(drifted)} of {len(features)} feature columns drifted ({share:.0%}, threshold "
            f"{monitoring.drift_share:.0%})")
    if drifted:
        note += ": " + ", ".join(_describe(c) for c in drifted)
    return NO_DRIFT, [note]


def embedding_reason(embedding: dict) -> str:
    """The line that says the embedding signal fired and what drives it."""
    grams = ", ".join(repr(g["ngram"]) for g in (embedding.get("drivers") or {}).get("ngrams", [])[:5])
    return (f"sentence embeddings drifted: domain-classifier score {embedding['score']:.3g} above "
            f"{embedding['threshold']:.3g} "
            f"(calibrated to {embedding['false_alarm_rate']:.0%} false alarms on the reference)"
            + (f"; driven by {grams}" if grams else ""))
