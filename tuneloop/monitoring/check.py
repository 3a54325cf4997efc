"""One drift check (:func:`check_drift`): scan the window, build the reference, run every signal,
decide, write the report.

Three signals over one window: the whole-window histograms (:mod:`.scan`, :mod:`.histograms`),
Evidently's report on the bounded sample (:mod:`.drift`) and the served model's sentence embeddings
(:mod:`.embeddings`); :func:`~tuneloop.monitoring.decision.decide` combines them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.errors import TuneloopError
from tuneloop.monitoring.common import (
    DRIFT,
    INSUFFICIENT_DATA,
    REFERENCE_SEED,
    STAGE,
    MonitoringError,
    _iso,
    _jsonable,
)
from tuneloop.monitoring.decision import _check_critical_columns, _insufficient, decide
from tuneloop.monitoring.drift import (
    _prediction_summary,
    feedback_quality,
    run_drift_report,
)
from tuneloop.monitoring.embeddings import Embedder, embedding_drift, model_embedder
from tuneloop.monitoring.histograms import apply_window_tier
from tuneloop.monitoring.reference import (
    Reference,
    load_reference,
    monitored_version,
    reference_cache_dir,
    prepare_reference,
)
from tuneloop.monitoring.report import DriftReport, render_html, reports_dir, write_json
from tuneloop.monitoring.scan import CurrentData, scan_window, utc_now
from tuneloop.monitoring.window import Window, parse_window, with_statistics
from tuneloop.prediction_log import PREDICTED_LABEL as PREDICTION
from tuneloop.prediction_log import TEXT


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
    embedder: Embedder | None = None,
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
        embedder: the sentence embedder to use instead of the monitored version's model (tests,
            benchmarks). With a given ``reference`` and no embedder the embedding signal is not
            computed (the report says so).

    Raises:
        ConfigError: a bad window or an unknown critical column.
        RegistryError: the registry is unreachable or the version has no training frame.
        MonitoringError: embedding drift asked for with a model that cannot produce embeddings.
    """
    monitoring = config.monitoring
    window = window if isinstance(window, Window) else parse_window(window or monitoring.window)
    _check_critical_columns(config)
    now_ts = utc_now(now)
    report_id = f"drift-{now_ts:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    directory = reports_dir(config) / report_id
    html_path = Path(html_path) if html_path else directory / "report.html"
    json_path = Path(json_path) if json_path else directory / "report.json"

    version = model_version or monitored_version(config)
    current = scan_window(config, window, version, now=now_ts)
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
            "first_record": _iso(current.first_record),
            "last_record": _iso(current.last_record),
        },
        "log": {
            "uri": current.log_uri,
            "files_read": len(current.files_read),
            "files_skipped": current.files_skipped,
            "rows_in_window": current.rows_in_window,
            "other_versions": current.other_versions,
        },
        "rows": {"current": current.rows, "reference": 0, "min_rows": monitoring.min_rows},
        "thresholds": {
            "drift_share": monitoring.drift_share, "critical_columns": list(monitoring.critical_columns),
            "prediction_drift": monitoring.prediction_drift, "prediction_method": monitoring.prediction_method,
            "prediction_threshold": monitoring.prediction_threshold, "stattest": monitoring.stattest,
            "stattest_threshold": monitoring.stattest_threshold,
            "max_quality_drop_points": monitoring.max_quality_drop_points,
            "embedding_drift": monitoring.embedding_drift,
            "embedding_false_alarm_rate": monitoring.embedding_false_alarm_rate,
        },
        "reference": None,
        "columns": [],
        "drift_share": None,
        "drifted_columns": [],
        "embedding": None,
        "evidently_verdict": None,
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
        verdict, reasons, drift_snapshot, quality_snapshot = _analyse(
            config, current, version, summary, reference=reference, embedder=embedder)
    else:
        verdict, reasons = INSUFFICIENT_DATA, [reason]
    summary["verdict"] = verdict
    summary["drift"] = verdict == DRIFT
    summary["reasons"] = reasons
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(summary, drift_snapshot, quality_snapshot), encoding="utf-8")
    write_json(json_path, summary)
    return DriftReport(verdict=verdict, summary=summary, html_path=html_path, json_path=json_path)


def _current_sample(current: CurrentData) -> pd.DataFrame:
    frame = current.frame.assign(**{TEXT: current.frame[TEXT].fillna("").astype(str)})
    frame = with_statistics(frame, TEXT)
    frame[PREDICTION] = frame[PREDICTION].astype(str)
    return frame


def _analyse(config: TuneloopConfig, current: CurrentData, version: str, summary: dict, *,
             reference: pd.DataFrame | None, embedder: Embedder | None):
    """Every signal on a window with enough records; fills ``summary`` and returns the verdict, its
    reasons and Evidently's snapshots."""
    ref = Reference(frame=reference, uri="(given)", predictions="given", rows_available=len(reference)) \
        if reference is not None else load_reference(config, version)
    reference_frame = prepare_reference(config, ref, version)
    if reference_frame.empty:
        raise MonitoringError(f"the reference frame {ref.uri} holds no rows with text", stage=STAGE, path=ref.uri)
    current_frame = _current_sample(current)
    if len(current_frame) < current.rows:
        summary["rows"]["analysed"] = len(current_frame)
    summary["reference"] = {"uri": ref.uri, "predictions": ref.predictions, "rows": len(reference_frame),
                            "rows_available": ref.rows_available}
    summary["rows"]["reference"] = len(reference_frame)
    try:
        drift_snapshot, sample_columns = run_drift_report(config, reference_frame, current_frame)
    except TuneloopError:
        raise
    except Exception as error:  # Evidently's own failure on odd data: one clean error
        raise MonitoringError(f"Evidently could not compute the drift report: {type(error).__name__}: {error}",
                              stage=STAGE) from error
    columns = apply_window_tier(sample_columns, reference_frame, current.value_counts, current.rows)
    summary["columns"] = columns
    summary["prediction"] = _prediction_summary(columns, reference_frame, current_frame)
    summary["embedding"] = _embedding_signal(config, version, reference_frame, current_frame, embedder,
                                             given_reference=reference is not None)
    quality, quality_snapshot = feedback_quality(config, current.frame, ref.version_tags)
    summary["quality"] = quality
    embedding = summary["embedding"] if summary["embedding"] and "score" in summary["embedding"] else None
    verdict, reasons = decide(config, columns, quality, embedding)
    summary["evidently_verdict"] = decide(config, sample_columns, quality)[0]
    features = [c for c in columns if c["kind"] != "prediction"]
    drifted = [c for c in features if c["drifted"]]
    summary["drift_share"] = len(drifted) / len(features) if features else 0.0
    summary["drifted_columns"] = [c["column"] for c in columns if c["drifted"]] + \
        (["embedding"] if embedding and embedding["drifted"] else [])
    summary["evidently"] = _jsonable(drift_snapshot.dict())
    return verdict, reasons, drift_snapshot, quality_snapshot


def _embedding_signal(config: TuneloopConfig, version: str, reference: pd.DataFrame, current: pd.DataFrame,
                      embedder: Embedder | None, *, given_reference: bool) -> dict | None:
    """The embedding signal's result (``monitoring.embedding_drift``), or why it was not computed."""
    monitoring = config.monitoring
    if not monitoring.embedding_drift:
        return None
    if embedder is None and given_reference:
        return {"skipped": "a reference frame was given without an embedder"}
    embedder = embedder or model_embedder(config, version)
    limit = monitoring.embedding_max_rows
    rng = np.random.default_rng(REFERENCE_SEED)
    # Distinct texts on each side: a message repeated verbatim (a popular request) is one point of
    # meaning, and its copies would be each other's nearest neighbours in the window alone.
    reference_texts = pd.unique(reference[TEXT].astype(str).to_numpy())
    current_texts = pd.unique(current[TEXT].astype(str).to_numpy())
    if len(reference_texts) > limit:
        reference_texts = reference_texts[np.sort(rng.choice(len(reference_texts), limit, replace=False))]
    if len(current_texts) > limit:
        current_texts = current_texts[np.sort(rng.choice(len(current_texts), limit, replace=False))]
    reference_vectors = _reference_embeddings(config, version, embedder, list(reference_texts),
                                              cache=not given_reference)
    result = embedding_drift(reference_vectors, embedder.embed(list(current_texts)),
                             false_alarm_rate=monitoring.embedding_false_alarm_rate,
                             permutations=monitoring.embedding_permutations,
                             current_texts=_as_logged(config, current_texts),
                             reference_texts=list(reference_texts), drivers=monitoring.embedding_drivers)
    return {**result.to_dict(), "model": embedder.description, "distinct_current_texts": int(len(current_texts)),
            "current_rows": int(len(current))}


def _as_logged(config: TuneloopConfig, texts) -> list[str]:
    """The window's texts as the prediction log's privacy mode stores them, for the report's drift drivers:
    a log written before masking existed must not put raw personal data into a report."""
    from tuneloop.privacy import log_text_policy

    policy = log_text_policy(config.privacy)
    return [str(text) if policy is None else (policy(str(text)) or "") for text in texts]


def _reference_embeddings(config: TuneloopConfig, version: str, embedder: Embedder, texts: list[str], *,
                          cache: bool) -> np.ndarray:
    """The reference texts' embeddings, cached per version and texts in the pod's reference cache
    (``.npy``, no pickle): the reference of a version does not change between checks."""
    if not cache:
        return embedder.embed(texts)
    import hashlib

    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    path = reference_cache_dir(config, version) / f"embeddings-{digest}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    vectors = embedder.embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp.npy")
    np.save(temporary, vectors, allow_pickle=False)
    temporary.replace(path)
    return vectors
