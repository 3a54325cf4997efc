"""The Kubernetes target: read, patch and watch the rollout of the serving Deployment."""

from __future__ import annotations

from typing import Any

from tuneloop.deployment.common import ANNOTATION, DeploymentError, logger


def kubernetes_apps_api():
    """An ``AppsV1Api``: in-cluster service account first, else the local kubeconfig.

    Raises:
        DeploymentError: neither is available.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as error:  # missing or invalid kubeconfig
            raise DeploymentError(f"cannot reach Kubernetes: no in-cluster service account and no usable "
                                  f"kubeconfig ({error})") from error
    return client.AppsV1Api()


def _read_deployment(api, config):
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    try:
        return api.read_namespaced_deployment(name=name, namespace=namespace)
    except Exception as error:
        status = getattr(error, "status", None)
        if status == 404:
            raise DeploymentError(f"Deployment {namespace}/{name} does not exist; apply k8s/ first "
                                  f"(kubectl apply -k k8s/overlays/...)", field="deployment.deployment_name") from error
        raise DeploymentError(f"cannot read Deployment {namespace}/{name}: {_api_error(error)}") from error


def _container(deployment, config):
    containers = list(deployment.spec.template.spec.containers or [])
    if config.deployment.container:
        for container in containers:
            if container.name == config.deployment.container:
                return container
        raise DeploymentError(f"Deployment {config.deployment.deployment_name} has no container "
                              f"{config.deployment.container!r} (has {[c.name for c in containers]})",
                              field="deployment.container")
    from tuneloop.serving import VERSION_ENV

    for container in containers:
        if any(variable.name == VERSION_ENV for variable in container.env or []):
            return container
    return containers[0] if containers else None


def _live_version(deployment) -> str | None:
    """The model version a Deployment runs: its annotation, else the pod label, else a literal env value."""
    from tuneloop.serving import VERSION_ENV

    annotations = deployment.metadata.annotations or {}
    if annotations.get(ANNOTATION):
        return str(annotations[ANNOTATION])
    template_metadata = deployment.spec.template.metadata
    labels = (template_metadata.labels if template_metadata is not None else None) or {}
    if labels.get(ANNOTATION):
        return str(labels[ANNOTATION])
    for container in deployment.spec.template.spec.containers or []:
        for variable in container.env or []:
            if variable.name == VERSION_ENV and variable.value:
                return str(variable.value)
    return None


def _patch_version(api, config, version: str) -> None:
    from tuneloop.serving import VERSION_ENV

    deployment = _read_deployment(api, config)
    body: dict[str, Any] = {
        "metadata": {"annotations": {ANNOTATION: version}},
        "spec": {"template": {"metadata": {"labels": {ANNOTATION: version}, "annotations": {ANNOTATION: version}}}},
    }
    container = _container(deployment, config)
    if container is not None and any(v.name == VERSION_ENV and v.value_from is None for v in container.env or []):
        body["spec"]["template"]["spec"] = {
            "containers": [{"name": container.name, "env": [{"name": VERSION_ENV, "value": version}]}]
        }
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    try:
        api.patch_namespaced_deployment(name=name, namespace=namespace, body=body)
    except Exception as error:
        raise DeploymentError(f"cannot patch Deployment {namespace}/{name} to version {version}: "
                              f"{_api_error(error)}") from error
    logger.info("patched Deployment %s/%s to model version %s", namespace, name, version)


def rollout_state(deployment) -> tuple[bool, str]:
    """Whether a Deployment's rollout is complete (as ``kubectl rollout status`` decides), and why not."""
    status = deployment.status
    generation = deployment.metadata.generation or 0
    if status is None or (status.observed_generation or 0) < generation:
        return False, "waiting for the controller to observe the new generation"
    for condition in status.conditions or []:
        if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
            raise DeploymentError(f"rollout exceeded its progress deadline: {condition.message}")
    wanted = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    updated = status.updated_replicas or 0
    if updated < wanted:
        return False, f"{updated} of {wanted} replicas updated"
    if (status.replicas or 0) > updated:
        return False, f"{(status.replicas or 0) - updated} old replicas pending termination"
    if (status.available_replicas or 0) < updated:
        return False, f"{status.available_replicas or 0} of {updated} updated replicas available"
    return True, "complete"


def _wait_for_rollout(api, config, *, sleep, clock) -> None:
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    deadline = clock() + config.deployment.rollout_timeout_s
    reason = "not started"
    while True:
        try:
            deployment = api.read_namespaced_deployment_status(name=name, namespace=namespace)
        except Exception as error:
            raise DeploymentError(f"cannot read the rollout status of {namespace}/{name}: "
                                  f"{_api_error(error)}") from error
        done, reason = rollout_state(deployment)
        if done:
            return
        if clock() >= deadline:
            raise DeploymentError(f"rollout of {namespace}/{name} did not finish within "
                                  f"{config.deployment.rollout_timeout_s:g}s ({reason})",
                                  field="deployment.rollout_timeout_s")
        sleep(config.deployment.poll_interval_s)


def _api_error(error: Exception) -> str:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(error).__name__}: {error}"
