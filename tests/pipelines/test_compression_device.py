"""deployment.device in the compiled IR: a model that serves on a GPU gets GPU compress and evaluate
steps; a GPU compress step for CPU serving keeps evaluate on CPU and can only keep a CPU variant."""

import json

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.pipelines.conftest import cluster_config
from tuneloop.compression import VARIANTS, eligible_variants
from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError
from tuneloop.orchestration import compile_pipeline

KUBEFLOW = {"image": "registry.example/tuneloop:1.2.3", "gpu_image": "registry.example/tuneloop-gpu:1.2.3",
            "gpu": {"steps": ["finetune", "compress"]}}
ALL_VARIANTS = ["onnx_fp32", "onnx_int8_dynamic", "distilled_int8", "pruned_int8", "tensorrt_fp16",
                "distilled_tensorrt_int8"]


def compiled(tmp_path, device):
    config = cluster_config(kubeflow=KUBEFLOW, deployment={"device": device},
                            compression={"variants": ALL_VARIANTS})
    text = compile_pipeline("training", tmp_path / f"training-{device}.yaml", config).read_text()
    document = next(yaml.safe_load_all(text))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(document, spec, ignore_unknown_fields=False)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    containers = {}
    for dag in [spec.root.dag, *(component.dag for component in spec.components.values())]:
        for task_name, task in dag.tasks.items():
            label = spec.components[task.component_ref.name].executor_label
            if label:  # a sub-DAG (ExitHandler, If/Else) has no container of its own
                containers[task_name] = executors[label]["container"]
    baked = TuneloopConfig.from_json(document["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    return containers, baked


def on_gpu(container) -> bool:
    return container.get("resources", {}).get("accelerator", {}).get("resourceType") == "nvidia.com/gpu"


def test_cpu_serving_keeps_evaluate_on_cpu_and_only_cpu_variants_eligible(tmp_path):
    containers, baked = compiled(tmp_path, "cpu")
    assert on_gpu(containers["compress"]) and on_gpu(containers["finetune"])
    assert not on_gpu(containers["evaluate"]) and containers["evaluate"]["image"] == "registry.example/tuneloop:1.2.3"
    assert baked.deployment.device == "cpu"
    eligible = eligible_variants(baked.compression.candidates(), baked.deployment.device)
    assert eligible == ["onnx_fp32", "onnx_int8_dynamic", "distilled_int8", "pruned_int8"]
    assert all(VARIANTS[name].runtime == "onnxruntime" for name in eligible)


def test_gpu_serving_puts_compress_and_evaluate_on_gpu_nodes(tmp_path):
    containers, baked = compiled(tmp_path, "cuda")
    for step in ("finetune", "compress", "evaluate"):
        assert on_gpu(containers[step]), step
        assert containers[step]["image"] == "registry.example/tuneloop-gpu:1.2.3"
    assert not on_gpu(containers["register"])
    assert baked.deployment.device == "cuda"
    assert eligible_variants(baked.compression.candidates(), "cuda") == ["tensorrt_fp16", "distilled_tensorrt_int8"]


def test_compile_refuses_a_variant_list_with_nothing_for_the_device(tmp_path):
    config = cluster_config(kubeflow=KUBEFLOW, deployment={"device": "cuda"},
                            compression={"variants": ["onnx_int8_dynamic", "distilled_int8"]})
    with pytest.raises(ConfigError, match=r"leaves nothing that runs on deployment.device 'cuda'"):
        compile_pipeline("training", tmp_path / "training.yaml", config)
    assert not (tmp_path / "training.yaml").exists()
    assert json.loads(config.to_json())["deployment"]["device"] == "cuda"
