"""The training pipeline: validate -> features -> fine-tune -> compress -> evaluate -> [blessed?] register.

One definition runs two ways: through ``kfp.local`` on one machine (``tuneloop run --local``) and
compiled to KFP IR YAML for a cluster (``tuneloop compile pipelines/training.py``). Registration sits
under ``dsl.If`` on the gate's output; the ExitHandler reports failed runs to the alert sink.

Cluster settings (images, GPU nodes, resources, secrets, retries) come from the ``kubeflow``
section of the config at compile time: ``build_pipeline(config.kubeflow)``. ``kfp.local`` ignores them.
"""

from kfp import dsl, kubernetes

from components.alerts import notify, report_rejection
from components.compression import compress
from components.evaluation import evaluate
from components.features import retrieve_features
from components.registry import register
from components.training import finetune
from components.validation import validate_data
from tuneloop.config import KubeflowConfig

PIPELINE_NAME = "tuneloop-training"
TRANSIENT_STEPS = ("validate_data", "retrieve_features", "evaluate", "register")
"""Steps that only read or write external state: a retry is cheap and safe."""


def build_pipeline(kubeflow: KubeflowConfig | None = None):
    """The training pipeline with the cluster settings of ``kubeflow`` applied to its tasks."""
    kubeflow = kubeflow or KubeflowConfig()

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
            trained = finetune(
                config_json=config_json,
                dataset=features.outputs["dataset"],
                data_fingerprint=validated.outputs["fingerprint"],
                base_model=base_model,
                epochs=epochs,
                learning_rate=learning_rate,
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
            with dsl.Else(name="rejected"):
                rejected = report_rejection(
                    config_json=config_json,
                    decision=gate.outputs["decision"],
                    pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                )
        steps = {
            "validate_data": validated, "retrieve_features": features, "finetune": trained,
            "compress": compressed, "evaluate": gate, "register": registered, "report_rejection": rejected,
            "notify": exit_task,
        }
        for step, task in steps.items():
            configure_task(task, step, kubeflow)

    return training_pipeline


def configure_task(task, step: str, kubeflow: KubeflowConfig) -> None:
    """Apply image, resources, GPU, secrets, retries and caching to one task."""
    gpu = step in kubeflow.gpu.steps
    task.set_container_image(kubeflow.gpu_image if gpu else kubeflow.image)
    # Each step reads data or registry state that can change under the same parameters (new rows,
    # a new champion), so none may be answered from the cache.
    task.set_caching_options(False)
    _set_resources(task, kubeflow.resources.get(step) or kubeflow.resources.get("default"))
    if gpu:
        _request_gpu(task, kubeflow)
    if step in TRANSIENT_STEPS and kubeflow.retries:
        task.set_retry(num_retries=kubeflow.retries, backoff_duration="30s", backoff_factor=2.0)
    for secret in kubeflow.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.secret, secret_key_to_env={secret.key: secret.env},
                                     optional=True)


def _set_resources(task, resources) -> None:
    if resources is None:
        return
    if resources.cpu_request:
        task.set_cpu_request(resources.cpu_request)
    if resources.cpu_limit:
        task.set_cpu_limit(resources.cpu_limit)
    if resources.memory_request:
        task.set_memory_request(resources.memory_request)
    if resources.memory_limit:
        task.set_memory_limit(resources.memory_limit)


def _request_gpu(task, kubeflow: KubeflowConfig) -> None:
    gpu = kubeflow.gpu
    task.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.count)
    for label, value in gpu.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in gpu.tolerations:
        kubernetes.add_toleration(task, key=toleration.key, operator=toleration.operator, value=toleration.value,
                                  effect=toleration.effect)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=gpu.shm_size)


training_pipeline = build_pipeline()
