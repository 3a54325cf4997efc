"""The loop around a check (``tuneloop monitor``): on drift, a cooldown-guarded retraining run and
an alert naming what drifted."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.errors import TuneloopError
from tuneloop.monitoring.check import check_drift
from tuneloop.monitoring.common import (
    ALERT_COLUMNS,
    ALERT_KIND,
    EXIT_ALERT_SPOOLED,
    EXIT_CODES,
    _describe,
)
from tuneloop.monitoring.report import DriftReport

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
