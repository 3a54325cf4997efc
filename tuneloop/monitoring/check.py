"""One drift check (:func:`check_drift`): read the window, build the reference, run every signal,
decide, write the report."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

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
from tuneloop.monitoring.reference import (
    Reference,
    load_reference,
    monitored_version,
    prepare_reference,
)
from tuneloop.monitoring.report import DriftReport, render_html, reports_dir, write_json
from tuneloop.monitoring.window import (
    Window,
    load_current,
    parse_window,
    with_statistics,
)
from tuneloop.prediction_log import (
    PREDICTED_LABEL as PREDICTION,
)
from tuneloop.prediction_log import (
    TEXT,
    TIMESTAMP,
)


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
