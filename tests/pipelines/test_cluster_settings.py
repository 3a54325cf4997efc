"""Cluster settings in the compiled YAML: GPU, secrets by reference only, retries, caching, images."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from tuneloop.config import parse_config
from tuneloop.orchestration import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
SECRET_VALUE = "s3cr3t-planted-value-9b1f"


def compile_with(tmp_path, kubeflow: dict) -> tuple[pipeline_spec_pb2.PipelineSpec, dict, str]:
    config = parse_config({"name": "sms", "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["a", "b"]},
                           "kubeflow": kubeflow}, source="test")
    output = compile_pipeline(ROOT / "pipelines" / "training.py", tmp_path / "training.yaml", config)
    text = output.read_text()
    documents = list(yaml.safe_load_all(text))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(documents[0], spec, ignore_unknown_fields=False)
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor_config in platform.values():  # strict parse into the kfp-kubernetes protobuf
        json_format.ParseDict(executor_config, kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
                              ignore_unknown_fields=False)
    return spec, platform, text


@pytest.fixture(scope="module")
def gpu_compiled(tmp_path_factory):
    kubeflow = {
        "image": "registry.example/tuneloop:1.2.3",
        "gpu_image": "registry.example/tuneloop-gpu:1.2.3",
        "gpu": {"steps": ["finetune", "compress"], "count": 1, "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], "shm_size": "4Gi"},
        "resources": {"default": {"cpu_request": "500m", "memory_limit": "3Gi"}, "finetune": {"cpu_request": "6", "memory_limit": "24Gi"}},
        "retries": 3,
    }
    return compile_with(tmp_path_factory.mktemp("gpu"), kubeflow)


def executor_of(spec, task_name):
    for component in spec.components.values():
        if component.dag and task_name in component.dag.tasks:
            return spec.components[component.dag.tasks[task_name].component_ref.name].executor_label
    return spec.components[spec.root.dag.tasks[task_name].component_ref.name].executor_label


def test_gpu_steps_request_gpus_with_node_placement(gpu_compiled):
    spec, platform, _ = gpu_compiled
    containers = json_format.MessageToDict(spec.deployment_spec)["executors"]
    for task in ("finetune", "compress"):
        label = executor_of(spec, task)
        container = containers[label]["container"]
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert container["resources"]["accelerator"]["resourceCount"] == "1"
        assert container["image"] == "registry.example/tuneloop-gpu:1.2.3"
        assert platform[label]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert platform[label]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert platform[label]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    validate = containers[executor_of(spec, "validate-data")]["container"]
    assert "accelerator" not in validate.get("resources", {})
    assert validate["image"] == "registry.example/tuneloop:1.2.3"
    assert "tolerations" not in platform[executor_of(spec, "validate-data")]


def test_resources_come_from_config(gpu_compiled):
    spec, _, _ = gpu_compiled
    containers = json_format.MessageToDict(spec.deployment_spec)["executors"]
    finetune = containers[executor_of(spec, "finetune")]["container"]["resources"]
    assert finetune["resourceCpuRequest"] == "6" and finetune["resourceMemoryLimit"] == "24Gi"
    evaluate = containers[executor_of(spec, "evaluate")]["container"]["resources"]
    assert evaluate["resourceCpuRequest"] == "500m" and evaluate["resourceMemoryLimit"] == "3Gi"


def test_retries_on_transient_steps_and_no_caching(gpu_compiled):
    spec, _, _ = gpu_compiled
    tasks = {}
    for component in spec.components.values():
        tasks.update(component.dag.tasks)
    for name in ("validate-data", "retrieve-features", "evaluate", "register"):
        assert tasks[name].retry_policy.max_retry_count == 3, name
    assert tasks["finetune"].retry_policy.max_retry_count == 0
    for name in ("register", "evaluate", "finetune"):
        assert not tasks[name].caching_options.enable_cache, name


def test_secrets_are_referenced_by_name_only(tmp_path, monkeypatch):
    for variable in ("MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "TUNELOOP_WEBHOOK_URL", "TUNELOOP_KFP_TOKEN"):
        monkeypatch.setenv(variable, SECRET_VALUE)
    spec, platform, text = compile_with(tmp_path, {})
    assert SECRET_VALUE not in text
    register = platform[executor_of(spec, "register")]
    references = {(s["secretNameParameter"]["runtimeValue"]["constant"] if "secretNameParameter" in s else s["secretName"],
                   s["keyToEnv"][0]["envVar"]) for s in register["secretAsEnv"]}
    assert ("tuneloop-mlflow", "MLFLOW_TRACKING_TOKEN") in references
    assert ("tuneloop-alerts", "TUNELOOP_WEBHOOK_URL") in references
