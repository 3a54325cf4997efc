"""The monitoring components: `monitor_drift`, `notify_drift` and `trigger_retraining`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def monitor_drift(
    config_json: str,
    report: Output[HTML],
    summary: Output[Artifact],
    metrics: Output[Metrics],
    window: str = "",
) -> NamedTuple("DriftOutputs", drift=bool, verdict=str, report_id=str):
    """Compare the prediction log of the champion over the window with its training frame (Evidently).

    Writes the HTML report and the JSON summary; ``drift`` is True only when the configured
    thresholds say so (never below ``monitoring.min_rows`` records: then ``insufficient_data``).
    """
    from collections import namedtuple

    from tuneloop import monitoring
    from tuneloop.config import TuneloopConfig

    result = monitoring.check_drift(
        TuneloopConfig.from_json(config_json), window or None,
        html_path=report.path, json_path=summary.path, report_uri=report.uri,
    )
    summary.metadata.update({"verdict": result.verdict, "report_id": result.report_id})
    metrics.log_metric("current_rows", result.summary["rows"]["current"])
    if result.summary["drift_share"] is not None:
        metrics.log_metric("drift_share", result.summary["drift_share"])
    outputs = namedtuple("DriftOutputs", ["drift", "verdict", "report_id"])
    return outputs(result.drift, result.verdict, result.report_id)


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def notify_drift(config_json: str, summary: Input[Artifact]) -> NamedTuple("AlertOutputs", webhook=str, spooled=bool):
    """Send the drift alert: what drifted and by how much, which version, where the report is.

    An alert the webhook refuses after its retries is spooled and re-sent by the next alert.
    """
    from collections import namedtuple

    from tuneloop import monitoring
    from tuneloop.config import TuneloopConfig

    alert = monitoring.send_drift_alert(TuneloopConfig.from_json(config_json), monitoring.read_report(summary.path))
    return namedtuple("AlertOutputs", ["webhook", "spooled"])(alert["webhook"], alert["spooled"])


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def trigger_retraining(
    config_json: str,
    summary: Input[Artifact],
    record: Output[Artifact],
) -> NamedTuple("TriggerOutputs", status=str, run_id=str):
    """Start the training pipeline for this drift report, at most once per cooldown.

    ``record`` is the drift report JSON with the ``retraining`` section (the run it started, or why
    none started). A failed start fails the step and leaves the ledger unmarked.
    """
    from collections import namedtuple

    from tuneloop import monitoring, retraining
    from tuneloop.config import TuneloopConfig

    report = monitoring.read_report(summary.path)
    outcome = retraining.trigger_retraining(
        TuneloopConfig.from_json(config_json),
        retraining.RetrainingRequest(report_id=report["report_id"], report_path=report.get("report_uri", ""),
                                     model_version=str(report.get("model_version")),
                                     reasons=tuple(report.get("reasons", []))),
    )
    monitoring.write_json(record.path, {**report, "retraining": outcome.to_dict()})
    return namedtuple("TriggerOutputs", ["status", "run_id"])(outcome.status, outcome.run_id)
