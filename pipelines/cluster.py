"""Cluster settings shared by the pipelines: image, resources, GPU nodes, secrets, retries, caching.

Read from the ``kubeflow`` section of the config at compile time; ``kfp.local`` ignores them.
Each entry of ``kubeflow.secrets`` reaches the steps it lists (all steps when it lists none).
"""

from kfp import kubernetes

from tuneloop.config import KubeflowConfig


def configure_task(task, step: str, kubeflow: KubeflowConfig, *, retried_steps: tuple[str, ...]) -> None:
    """Apply image, resources, GPU, secrets, retries and caching to one task of either pipeline."""
    gpu = step in kubeflow.gpu.steps
    task.set_container_image(kubeflow.gpu_image if gpu else kubeflow.image)
    # Every step reads data, logs or registry state that can change under the same parameters (new
    # rows, a new champion), so none may be answered from the cache.
    task.set_caching_options(False)
    _set_resources(task, kubeflow.resources.get(step) or kubeflow.resources.get("default"))
    if gpu:
        _request_gpu(task, kubeflow)
    if step in retried_steps and kubeflow.retries:
        task.set_retry(num_retries=kubeflow.retries, backoff_duration="30s", backoff_factor=2.0)
    _use_secrets(task, step, kubeflow)


def _use_secrets(task, step: str, kubeflow: KubeflowConfig) -> None:
    """The step's Secrets as environment variables, by reference. None is optional: a step that needs
    a credential must not start without it, so a missing Secret fails the pod at start with
    Kubernetes' own message (``secret "..." not found``)."""
    for secret in kubeflow.secrets:
        if secret.applies_to(step):
            kubernetes.use_secret_as_env(task, secret_name=secret.secret, secret_key_to_env={secret.key: secret.env},
                                         optional=False)


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
