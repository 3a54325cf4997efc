"""``training.backend: trainjob``: fine-tuning handed to Kubeflow Trainer v2 as a ``TrainJob``.

The ``finetune`` step becomes a launcher: it uploads the dataset and config next to where the job
will write the model, creates a ``TrainJob`` (runtime ``torch-distributed``: nodes, processes per
node, resources, and the GPU count, node selector and tolerations of ``kubeflow.gpu``) whose ranks
run :mod:`tuneloop.training.worker` under torchrun, waits for it while reporting its progress, and
copies the model into its own ``Output[Model]``.

The job is named from the pipeline run and task, so a retried launcher finds its own job and
attaches to it instead of starting a second one (GCPC launchers do the same). The manifest is
checked against the official Trainer API models (``kubeflow-trainer-api``) before it is sent.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError, ServiceUnavailableError, TrainingError
from tuneloop.training import storage
from tuneloop.training.checkpoints import run_key
from tuneloop.training.finetune import TrainingSummary, checkpoint_root, with_overrides

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME_REPLICATED_JOB = "node"
"""The replicated job of the ``torch-distributed`` runtime that runs the trainer pods."""
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
PASSED_THROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL")
"""Non-secret settings the launcher pod has and the job's pods need to reach the same object store."""


class CustomObjects(Protocol):
    """The part of ``kubernetes.client.CustomObjectsApi`` the launcher uses (tests pass a fake)."""

    def create_namespaced_custom_object(self, group, version, namespace, plural, body): ...

    def get_namespaced_custom_object(self, group, version, namespace, plural, name): ...


@dataclass
class JobState:
    """What a TrainJob's status says: finished or not, and how it is going."""

    phase: str  # pending | running | succeeded | failed
    message: str = ""
    progress: int | None = None
    remaining_s: int | None = None

    def describe(self) -> str:
        parts = [self.phase]
        if self.progress is not None:
            parts.append(f"{self.progress}%")
        if self.remaining_s is not None:
            parts.append(f"about {self.remaining_s}s left")
        return ", ".join(parts)


def job_name(pipeline_run: str, task: str) -> str:
    """A DNS-1123 name, the same for every attempt of one task of one pipeline run."""
    key = f"{pipeline_run}/{task}"
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{pipeline_run}-{task}".lower()).strip("-")[:40].strip("-")
    return f"tl-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def build_trainjob(config: TuneloopConfig, name: str, namespace: str, work_uri: str, *, pipeline_run: str,
                   task: str, data_fingerprint: str) -> dict[str, Any]:
    """The TrainJob manifest (a plain dict in the API's own field names)."""
    job, kubeflow = config.training.trainjob, config.kubeflow
    on_gpu = "finetune" in kubeflow.gpu.steps
    limits = {"cpu": job.cpu, "memory": job.memory}
    if on_gpu:
        limits[kubeflow.gpu.accelerator] = str(kubeflow.gpu.count)
    env = [{"name": secret.env, "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": secret.key}}}
           for secret in kubeflow.secrets]
    env += [{"name": key, "value": value} for key, value in _passed_through_env().items()]
    manifest: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "tuneloop", "tuneloop/task": run_key(task)[:63]},
            "annotations": {"tuneloop/pipeline-run": pipeline_run, "tuneloop/work-uri": work_uri},
        },
        "spec": {
            "runtimeRef": {"name": job.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": kubeflow.gpu_image if on_gpu else kubeflow.image,
                "command": ["torchrun", "-m", "tuneloop.training.worker"],
                "args": ["--config-json", f"{work_uri}/config.json", "--dataset", f"{work_uri}/dataset.parquet",
                         "--output", "/tmp/tuneloop/model", "--fingerprint", data_fingerprint,
                         "--pipeline-run", pipeline_run, "--task", task, "--upload-to", f"{work_uri}/model"],
                "env": env,
                "numNodes": job.nodes,
                "numProcPerNode": job.processes_per_node,
                "resourcesPerNode": {"limits": limits, "requests": {"cpu": job.cpu, "memory": job.memory}},
            },
        },
    }
    if on_gpu and (kubeflow.gpu.node_selector or kubeflow.gpu.tolerations):
        pod_spec: dict[str, Any] = {}
        if kubeflow.gpu.node_selector:
            pod_spec["nodeSelector"] = dict(kubeflow.gpu.node_selector)
        if kubeflow.gpu.tolerations:
            pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in kubeflow.gpu.tolerations]
        manifest["spec"]["runtimePatches"] = [{
            "manager": "tuneloop",
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": RUNTIME_REPLICATED_JOB, "template": {"spec": {"template": {"spec": pod_spec}}}},
            ]}}},
        }]
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: dict[str, Any]) -> None:
    """Parse the manifest with the official Trainer API model; a field it would drop is an error.

    Raises:
        TrainingError: a field the TrainJob API does not know, or a value of the wrong type.
    """
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(manifest)
    except ValidationError as error:
        raise TrainingError(f"TrainJob manifest does not fit the Trainer API: {error.errors()[0]}",
                            stage="training") from None
    unknown = _dropped_fields(manifest, parsed.to_dict())
    if unknown:
        raise TrainingError(f"TrainJob manifest has fields the Trainer API does not know: {unknown}",
                            stage="training")


def train(config: TuneloopConfig, dataset_path: str | Path, output_dir: str | Path, *, base_model=None,
          epochs=None, learning_rate=None, data_fingerprint: str = "", pipeline_run: str = "",
          task: str = "finetune", api: CustomObjects | None = None, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] | None = None) -> TrainingSummary:
    """Launch (or attach to) this task's TrainJob, wait for it, and copy its model to ``output_dir``.

    Raises:
        ConfigError: no pipeline run name (the job could not be found again by a retry), or no namespace.
        TrainingError: the job failed (its name and message), or did not finish within ``timeout_s``.
        ServiceUnavailableError: the Kubernetes API or the object store cannot be reached.
    """
    log = log or (lambda line: print(line, flush=True))
    if not pipeline_run:
        raise ConfigError("training.backend trainjob needs the pipeline run name (the finetune step's "
                          "pipeline_run input) to name its TrainJob", stage="training", field="training.backend")
    settings = with_overrides(config.training, base_model, epochs, learning_rate)
    config = config.model_copy(update={"training": settings})
    namespace = _namespace(config)
    name = job_name(pipeline_run, task)
    work_uri = _work_uri(config, pipeline_run, task)
    api = api or _kubernetes_api()
    existing = _get(api, namespace, name)
    if existing is not None:
        log(f"finetune: attaching to TrainJob {namespace}/{name}, started by an earlier attempt of this step")
    else:
        storage.upload_file(dataset_path, f"{work_uri}/dataset.parquet")
        _upload_text(config.to_json(), f"{work_uri}/config.json", Path(output_dir).parent)
        manifest = build_trainjob(config, name, namespace, work_uri, pipeline_run=pipeline_run, task=task,
                                  data_fingerprint=data_fingerprint)
        if _create(api, namespace, manifest):
            log(f"finetune: created TrainJob {namespace}/{name} (runtime {settings.trainjob.runtime}, "
                f"{settings.trainjob.nodes} node(s) x {settings.trainjob.processes_per_node} process(es))")
        else:
            log(f"finetune: TrainJob {namespace}/{name} already exists (a concurrent attempt); attaching")
    _wait(api, namespace, name, settings.trainjob.timeout_s, settings.trainjob.poll_s, sleep, clock, log)
    storage.download_directory(f"{work_uri}/model", output_dir)
    log(f"finetune: TrainJob {namespace}/{name} succeeded; model copied from {work_uri}/model")
    return TrainingSummary.from_model_dir(output_dir)


def job_state(trainjob: dict[str, Any]) -> JobState:
    """Read a TrainJob's status: the ``Complete``/``Failed`` conditions, child jobs and trainer progress."""
    status = trainjob.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    trainer = status.get("trainerStatus") or {}
    progress, remaining = trainer.get("progressPercentage"), trainer.get("estimatedRemainingSeconds")
    if "Failed" in conditions:
        failed = conditions["Failed"]
        return JobState("failed", ": ".join(filter(None, [failed.get("reason"), failed.get("message")])))
    if "Complete" in conditions:
        return JobState("succeeded", conditions["Complete"].get("message", ""), 100, 0)
    active = sum(job.get("active", 0) or 0 for job in status.get("jobsStatus") or [])
    return JobState("running" if active else "pending", "", progress, remaining)


def _wait(api, namespace, name, timeout_s, poll_s, sleep, clock, log) -> None:
    started, last = clock(), None
    while True:
        current = _get(api, namespace, name)
        if current is None:
            raise TrainingError(f"TrainJob {namespace}/{name} disappeared while finetune waited for it "
                                "(deleted by someone?)", stage="training")
        state = job_state(current)
        if state.describe() != last:
            log(f"finetune: TrainJob {namespace}/{name}: {state.describe()}")
            last = state.describe()
        if state.phase == "succeeded":
            return
        if state.phase == "failed":
            raise TrainingError(f"TrainJob {namespace}/{name} failed: {state.message or 'no message in its status'}",
                                stage="training")
        if clock() - started >= timeout_s:
            raise TrainingError(f"TrainJob {namespace}/{name} did not finish within training.trainjob.timeout_s "
                                f"{timeout_s}s (last state: {state.describe()}); a retry attaches to it again",
                                stage="training", field="training.trainjob.timeout_s")
        sleep(poll_s)


def _get(api, namespace: str, name: str) -> dict | None:
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as error:  # kubernetes.client.ApiException or a connection error
        if getattr(error, "status", None) == 404:
            return None
        raise _api_error(error, f"read TrainJob {namespace}/{name}") from error


def _create(api, namespace: str, manifest: dict) -> bool:
    """True when created; False when a job of that name already exists (409: attach to it)."""
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        return True
    except Exception as error:
        if getattr(error, "status", None) == 409:
            return False
        raise _api_error(error, f"create TrainJob {namespace}/{manifest['metadata']['name']}") from error


def _api_error(error: Exception, what: str) -> Exception:
    status = getattr(error, "status", None)
    if status is not None and 400 <= status < 500:
        reason = getattr(error, "reason", "") or str(error)
        hint = " (the pipeline runner needs the tuneloop-trainjobs Role)" if status == 403 else ""
        return TrainingError(f"cannot {what}: HTTP {status} {reason}{hint}", stage="training")
    return ServiceUnavailableError(f"cannot {what}: {error}", service="kubernetes API")


def _namespace(config: TuneloopConfig) -> str:
    if config.training.trainjob.namespace:
        return config.training.trainjob.namespace
    if NAMESPACE_FILE.is_file():
        return NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    raise ConfigError("training.trainjob.namespace is unset and this pod has no service-account namespace file",
                      stage="training", field="training.trainjob.namespace")


def _work_uri(config: TuneloopConfig, pipeline_run: str, task: str) -> str:
    root = config.training.trainjob.model_uri or f"{checkpoint_root(config).rstrip('/')}/trainjobs"
    return f"{root.rstrip('/')}/{run_key(pipeline_run)}/{run_key(task)}"


def _upload_text(text: str, uri: str, scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / ".tuneloop-trainjob-config.json"
    local.write_text(text, encoding="utf-8")
    storage.upload_file(local, uri)
    local.unlink()


def _passed_through_env() -> dict[str, str]:
    import os

    return {key: os.environ[key] for key in PASSED_THROUGH_ENV if os.environ.get(key)}


def _kubernetes_api() -> CustomObjects:
    from kubernetes import client, config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.CustomObjectsApi()


def _dropped_fields(sent: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(sent, dict):
        kept = kept if isinstance(kept, dict) else {}
        dropped = []
        for key, value in sent.items():
            where = f"{path}.{key}" if path else key
            if key not in kept:
                dropped.append(where)
            else:
                dropped += _dropped_fields(value, kept[key], where)
        return dropped
    if isinstance(sent, list) and isinstance(kept, list):
        return [field for i, (a, b) in enumerate(zip(sent, kept)) for field in _dropped_fields(a, b, f"{path}[{i}]")]
    return []
