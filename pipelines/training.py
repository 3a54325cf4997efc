"""The training pipeline: validate -> features -> check frame -> fine-tune -> compress -> evaluate -> [blessed?] register -> deploy.

One definition runs two ways: through ``kfp.local`` on one machine (``tuneloop run --local``) and
compiled to KFP IR YAML for a cluster (``tuneloop compile training``). Registration
(alias ``challenger``) and deployment (rollout + smoke test, then alias ``champion``) sit under
``dsl.If`` on the gate's output; the ExitHandler reports failed runs to the alert sink.

Cluster settings (images, GPU nodes, resources, secrets, retries) come from the ``kubeflow``
section of the config at compile time: ``build_pipeline(config.kubeflow)``. ``kfp.local`` ignores them.
With ``tuning.in_pipeline`` (``build_pipeline(config.kubeflow, config.tuning)``), a hyperparameter
search sits between the frame check and ``finetune``: ``tuning.parallelism`` trial workers under a
``dsl.ParallelFor`` share one Optuna study, and ``best_parameters`` hands the best config to ``finetune``.
"""

from kfp import dsl

from components.alerts import notify, report_rejection
from components.compression import compress
from components.deployment import deploy
from components.evaluation import evaluate
from components.features import retrieve_features
from components.frame_checks import validate_frame
from components.registry import register
from components.training import finetune
from components.tuning import best_parameters, search_trials
from components.validation import validate_data
from pipelines.cluster import configure_task
from tuneloop.config import KubeflowConfig, TuningConfig

PIPELINE_NAME = "tuneloop-training"
TRANSIENT_STEPS = ("validate_data", "retrieve_features", "validate_frame", "finetune", "evaluate", "register",
                   "deploy", "search_trials")
"""Steps a retry repeats safely: they only read or write external state, resume from their own
checkpoint (``finetune``, keyed by pipeline run and task) or only add the trials their shared study
still lacks (a trial worker)."""


def build_pipeline(kubeflow: KubeflowConfig | None = None, tuning: TuningConfig | None = None):
    """The training pipeline with the cluster settings of ``kubeflow`` applied to its tasks, and the
    search step when ``tuning.in_pipeline`` asks for it (a compile-time switch: off by default)."""
    kubeflow = kubeflow or KubeflowConfig()
    search = tuning is not None and tuning.in_pipeline

    @dsl.pipeline(name=PIPELINE_NAME, description="Validate, fine-tune, compress, gate and register a text classifier.")
    def training_pipeline(
        config_json: str,
        base_model: str = "",
        epochs: int = 0,
        learning_rate: float = 0.0,
    ):
        """Train a text classifier and register it as champion when it passes the gate.

        Args:
            config_json: the whole tuneloop.yaml as JSON (``tuneloop compile/run`` fill it in).
            base_model: override of training.base_model (empty keeps the config's).
            epochs: override of training.epochs (0 keeps the config's).
            learning_rate: override of training.learning_rate (0 keeps the config's).
        """
        exit_task = notify(config_json=config_json)
        with dsl.ExitHandler(exit_task, name="report-failures"):
            validated = validate_data(config_json=config_json)
            features = retrieve_features(config_json=config_json).after(validated)
            # the frame finetune trains on is checked too, and its fingerprint is the lineage
            frame_checked = validate_frame(config_json=config_json, dataset=features.outputs["dataset"])
            search_steps, training_config = {}, config_json
            if search:
                search_steps = _search(config_json, features.outputs["dataset"], tuning.parallelism, frame_checked)
                training_config = search_steps["best_parameters"].outputs["best_config_json"]
            trained = finetune(
                config_json=training_config,
                dataset=features.outputs["dataset"],
                data_fingerprint=frame_checked.outputs["fingerprint"],
                base_model=base_model,
                epochs=epochs,
                learning_rate=learning_rate,
                pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,  # checkpoint key: a retry resumes
                task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            )
            compressed = compress(
                config_json=config_json, model=trained.outputs["model"], dataset=features.outputs["dataset"]
            )
            gate = evaluate(
                config_json=config_json,
                dataset=features.outputs["dataset"],
                model=trained.outputs["model"],
                compressed=compressed.outputs["compressed"],
            )
            with dsl.If(gate.outputs["blessed"] == True, name="blessed"):  # noqa: E712 (KFP condition syntax)
                registered = register(
                    config_json=config_json,
                    compressed=compressed.outputs["compressed"],
                    decision=gate.outputs["decision"],
                    dataset=features.outputs["dataset"],
                    pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                )
                deployed = deploy(config_json=config_json, version=registered.outputs["version"],
                                  pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            with dsl.Else(name="rejected"):
                rejected = report_rejection(
                    config_json=config_json,
                    decision=gate.outputs["decision"],
                    pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                )
        steps = {
            "validate_data": validated, "retrieve_features": features, "validate_frame": frame_checked,
            **search_steps, "finetune": trained,
            "compress": compressed, "evaluate": gate, "register": registered, "deploy": deployed,
            "report_rejection": rejected,
            "notify": exit_task,
        }
        for step, task in steps.items():
            configure_task(task, step, kubeflow, retried_steps=TRANSIENT_STEPS)

    return training_pipeline


def _search(config_json, dataset, parallelism: int, frame_checked) -> dict:
    """Trial workers of one shared study under a ParallelFor, then the study's best config."""
    with dsl.ParallelFor(items=list(range(parallelism)), parallelism=parallelism, name="trial-workers") as worker:
        workers = search_trials(config_json=config_json, dataset=dataset, worker=worker).after(frame_checked)
    best = best_parameters(config_json=config_json, dataset=dataset).after(workers)
    return {"search_trials": workers, "best_parameters": best}


training_pipeline = build_pipeline()
