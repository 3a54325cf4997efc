"""The `notify` component: the exit handler that reports how a run ended."""

from kfp import dsl

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def notify(config_json: str, status: dsl.PipelineTaskFinalStatus):
    """Send an alert when the pipeline run failed (runs as the ExitHandler's exit task)."""
    from tuneloop import alerts
    from tuneloop.config import TuneloopConfig

    config = TuneloopConfig.from_json(config_json)
    if status.state == "SUCCEEDED":
        print(f"notify: run {status.pipeline_job_resource_name} succeeded", flush=True)
        return
    alerts.send_alert(
        config,
        "pipeline_failed",
        f"training run {status.pipeline_job_resource_name} ended {status.state}",
        {"run": status.pipeline_job_resource_name, "error": status.error_message, "state": status.state},
    )


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def report_rejection(config_json: str, decision: dsl.Input[dsl.Artifact], pipeline_run: str = ""):
    """Send an alert naming each failed gate check when the gate did not bless the model."""
    from tuneloop import alerts
    from tuneloop.config import TuneloopConfig
    from tuneloop.evaluation import read_decision

    gate = read_decision(decision.path)
    failed = [check for check in gate.get("checks", []) if not check.get("passed")]
    names = ", ".join(f"{c['name']}={c['value']} (threshold {c['threshold']})" for c in failed) or "unknown"
    alerts.send_alert(
        TuneloopConfig.from_json(config_json),
        "model_rejected",
        f"the gate did not bless the model of run {pipeline_run}: {names}",
        {"run": pipeline_run, "failed_checks": failed},
    )
