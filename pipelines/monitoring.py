"""The monitoring pipeline: monitor_drift -> [drift?] -> notify_drift, then trigger_retraining.

Served traffic (the prediction log) is compared with the champion's training frame; on drift an
alert goes out and a cooldown-guarded retraining run starts (``tuneloop.retraining``). The alert
goes first, so it is out before a local training run (synchronous under ``kfp.local``) begins. The
ExitHandler reports a failed run (e.g. a retraining trigger that could not start) to the alert sink.

One definition runs two ways, like the training pipeline: ``kfp.local`` on one machine and compiled
to KFP IR YAML for a cluster (``tuneloop compile monitoring``), where a recurring run
(``tuneloop schedule``) makes it the periodic drift check. Cluster settings come from the config's
``kubeflow`` section at compile time: ``build_pipeline(config.kubeflow)``.
"""

from kfp import dsl

from components.alerts import notify
from components.monitoring import monitor_drift, notify_drift, trigger_retraining
from pipelines.cluster import configure_task
from tuneloop.config import KubeflowConfig

PIPELINE_NAME = "tuneloop-monitoring"
RETRIED_STEPS = ("monitor_drift", "trigger_retraining")
"""Steps that only read external state, or are idempotent through the trigger ledger."""


def build_pipeline(kubeflow: KubeflowConfig | None = None):
    """The monitoring pipeline with the cluster settings of ``kubeflow`` applied to its tasks."""
    kubeflow = kubeflow or KubeflowConfig()

    @dsl.pipeline(name=PIPELINE_NAME, description="Check served traffic for drift; alert and retrain on drift.")
    def monitoring_pipeline(config_json: str, window: str = ""):
        """Check the prediction log for drift against the champion's training data.

        Args:
            config_json: the whole tuneloop.yaml as JSON (``tuneloop compile/run`` fill it in).
            window: ``24h``, ``7d`` or a number of recent records like ``5000`` (empty: monitoring.window).
        """
        exit_task = notify(config_json=config_json)
        with dsl.ExitHandler(exit_task, name="report-failures"):
            check = monitor_drift(config_json=config_json, window=window)
            with dsl.If(check.outputs["drift"] == True, name="drift"):  # noqa: E712 (KFP condition syntax)
                alert = notify_drift(config_json=config_json, summary=check.outputs["summary"])
                trigger = trigger_retraining(config_json=config_json, summary=check.outputs["summary"]).after(alert)
        steps = {"monitor_drift": check, "notify_drift": alert, "trigger_retraining": trigger, "notify": exit_task}
        for step, task in steps.items():
            configure_task(task, step, kubeflow, retried_steps=RETRIED_STEPS)

    return monitoring_pipeline


monitoring_pipeline = build_pipeline()
