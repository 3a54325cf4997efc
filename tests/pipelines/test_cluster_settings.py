"""Cluster settings in the compiled YAML: GPU, secrets by reference only, retries, caching, images."""

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.pipelines.conftest import cluster_config, k8s_config
from tuneloop.orchestration import compile_pipeline

SECRET_VALUE = "s3cr3t-planted-value-9b1f"


def compile_with(tmp_path, kubeflow: dict, pipeline: str = "training",
                 **sections) -> tuple[pipeline_spec_pb2.PipelineSpec, dict, str]:
    config = cluster_config(kubeflow=kubeflow, **sections)
    output = compile_pipeline(pipeline, tmp_path / f"{pipeline}.yaml", config)
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


@pytest.mark.parametrize("gpu_steps", [None, []], ids=["shipped", "no-gpu-nodes"])
def test_the_shipped_cluster_config_trains_on_a_gpu_node_unless_told_there_is_none(tmp_path, gpu_steps):
    """k8s/base/config/tuneloop.yaml puts finetune on a GPU node; ``kubeflow.gpu.steps: []`` (README:
    a cluster without GPU nodes) compiles it with CPU and memory only."""
    config = k8s_config()
    if gpu_steps is not None:
        config.kubeflow.gpu.steps = gpu_steps
    output = compile_pipeline("training", tmp_path / "training.yaml", config)
    documents = list(yaml.safe_load_all(output.read_text()))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(documents[0], spec, ignore_unknown_fields=False)
    platform = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = json_format.MessageToDict(spec.deployment_spec)["executors"]
    label = executor_of(spec, "finetune")
    finetune = containers[label]["container"]
    if gpu_steps is None:
        accelerator = finetune["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "1")
        assert finetune["image"] == config.kubeflow.gpu_image
        assert platform[label]["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "accelerator" not in finetune.get("resources", {})
        assert finetune["image"] == config.kubeflow.image and "tolerations" not in platform[label]
    for step in ("validate-data", "evaluate"):
        assert "accelerator" not in containers[executor_of(spec, step)]["container"].get("resources", {}), step


def test_retries_on_transient_steps_and_no_caching(gpu_compiled):
    spec, _, _ = gpu_compiled
    tasks = {}
    for component in spec.components.values():
        tasks.update(component.dag.tasks)
    # finetune resumes from its checkpoint (keyed by pipeline run and task), so a retry is safe too
    for name in ("validate-data", "retrieve-features", "validate-frame", "finetune", "evaluate", "register"):
        assert tasks[name].retry_policy.max_retry_count == 3, name
    assert tasks["compress"].retry_policy.max_retry_count == 0
    for name in ("register", "evaluate", "finetune"):
        assert not tasks[name].caching_options.enable_cache, name


def test_secrets_are_referenced_by_name_only(tmp_path, monkeypatch):
    for variable in ("MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "TUNELOOP_WEBHOOK_URL", "TUNELOOP_KFP_TOKEN",
                     "TUNELOOP_DATABASE_URL", "FEAST_REGISTRY_URL", "FEAST_REDIS_CONNECTION", "TUNELOOP_API_KEY"):
        monkeypatch.setenv(variable, SECRET_VALUE)
    spec, platform, text = compile_with(tmp_path, {})
    assert SECRET_VALUE not in text
    register = platform[executor_of(spec, "register")]
    references = {(s["secretNameParameter"]["runtimeValue"]["constant"] if "secretNameParameter" in s else s["secretName"],
                   s["keyToEnv"][0]["envVar"]) for s in register["secretAsEnv"]}
    assert ("tuneloop-mlflow", "MLFLOW_TRACKING_TOKEN") in references
    assert ("tuneloop-alerts", "TUNELOOP_WEBHOOK_URL") in references


def secret_refs(platform: dict, label: str) -> set[tuple[str, str, str]]:
    """(Secret, key, env var) of every secretAsEnv of one executor; each one must not be optional."""
    refs = set()
    for entry in platform[label].get("secretAsEnv", []):
        assert entry["optional"] is False, f"{label}: Secret {entry['secretName']} is optional"
        name = entry["secretNameParameter"]["runtimeValue"]["constant"]
        refs.update((name, item["secretKey"], item["envVar"]) for item in entry["keyToEnv"])
    return refs


@pytest.fixture(scope="module")
def default_compiled(tmp_path_factory):
    return compile_with(tmp_path_factory.mktemp("default"), {})


def test_every_step_gets_its_secrets_required_and_by_reference(default_compiled):
    spec, platform, _ = default_compiled
    storage = {("tuneloop-storage", "access-key-id", "AWS_ACCESS_KEY_ID"),
               ("tuneloop-storage", "secret-access-key", "AWS_SECRET_ACCESS_KEY")}
    state = ("tuneloop-state", "database-url", "TUNELOOP_DATABASE_URL")
    feast = {("tuneloop-feast", "registry-url", "FEAST_REGISTRY_URL"),
             ("tuneloop-feast", "redis-connection", "FEAST_REDIS_CONNECTION")}
    api_key = ("tuneloop-serving", "api-key", "TUNELOOP_API_KEY")
    for task in ("validate-data", "retrieve-features", "finetune", "compress", "evaluate", "register", "deploy",
                 "report-rejection", "notify"):
        refs = secret_refs(platform, executor_of(spec, task))
        assert storage <= refs and state in refs, task
        assert ("tuneloop-mlflow", "token", "MLFLOW_TRACKING_TOKEN") in refs, task
        assert (feast <= refs) == (task == "retrieve-features"), task
        assert (api_key in refs) == (task == "deploy"), f"{task}: only deploy sends the serving API key"


def test_deploy_gets_the_api_key_under_the_configured_variable(tmp_path):
    spec, platform, _ = compile_with(tmp_path, {}, deployment={"api_key_env": "SMS_SERVING_KEY"})
    assert ("tuneloop-serving", "api-key", "SMS_SERVING_KEY") in secret_refs(platform, executor_of(spec, "deploy"))
    assert not any(env == "SMS_SERVING_KEY" for _, _, env in secret_refs(platform, executor_of(spec, "register")))


def test_secret_steps_restrict_a_secret_to_the_steps_listed(tmp_path):
    secrets = [{"secret": "tuneloop-state", "key": "database-url", "env": "TUNELOOP_DATABASE_URL",
                "steps": ["deploy", "notify"]},
               {"secret": "tuneloop-feast", "key": "registry-url", "env": "FEAST_REGISTRY_URL"},
               {"secret": "tuneloop-feast", "key": "redis-connection", "env": "FEAST_REDIS_CONNECTION"}]
    spec, platform, _ = compile_with(tmp_path, {"secrets": secrets})
    for task, expected in (("deploy", True), ("notify", True), ("register", False), ("finetune", False)):
        refs = secret_refs(platform, executor_of(spec, task))
        assert (("tuneloop-state", "database-url", "TUNELOOP_DATABASE_URL") in refs) == expected, task
        assert ("tuneloop-feast", "registry-url", "FEAST_REGISTRY_URL") in refs, f"{task}: no steps means all"


def test_monitoring_steps_get_the_state_database_and_storage(tmp_path):
    spec, platform, text = compile_with(tmp_path, {}, pipeline="monitoring")
    for task in ("monitor-drift", "notify-drift", "trigger-retraining", "notify"):
        refs = secret_refs(platform, executor_of(spec, task))
        assert ("tuneloop-state", "database-url", "TUNELOOP_DATABASE_URL") in refs, task
        assert ("tuneloop-storage", "access-key-id", "AWS_ACCESS_KEY_ID") in refs, task
        assert not any(secret == "tuneloop-serving" for secret, _, _ in refs), task


def test_unknown_secret_step_is_a_config_error():
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match=r"kubeflow\.secrets\.0\.steps.*unknown steps \['deplyo'\]"):
        cluster_config(kubeflow={"secrets": [{"secret": "s", "key": "k", "env": "E", "steps": ["deplyo"]}]})


@pytest.mark.parametrize("field, section", [
    ("state.database_url_env", {"state": {"database_url_env": "SMS_DATABASE_URL"}}),
    ("features.registry_url_env", {"features": {"registry_url_env": "SMS_FEAST_REGISTRY"}}),
    ("features.redis_connection_env", {"features": {"redis_connection_env": "SMS_REDIS"}}),
])
def test_a_credential_variable_no_secret_fills_is_refused(tmp_path, field, section):
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        compile_with(tmp_path, {}, **section)
    lines = str(raised.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"  - {field}: ") and "kubeflow.secrets" in lines[1]
    assert not (tmp_path / "training.yaml").exists()
