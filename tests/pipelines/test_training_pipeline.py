"""The training pipeline compiles to IR YAML that parses strictly into the KFP PipelineSpec."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.pipelines.conftest import ROOT, cluster_config
from tuneloop.orchestration import compile_pipeline


def parse_strictly(path: Path) -> pipeline_spec_pb2.PipelineSpec:
    """Parse the first YAML document into PipelineSpec; unknown fields are errors."""
    documents = list(yaml.safe_load_all(path.read_text()))
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(documents[0], spec, ignore_unknown_fields=False)
    return spec


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> pipeline_spec_pb2.PipelineSpec:
    output = tmp_path_factory.mktemp("compiled") / "training.yaml"
    compile_pipeline("training", output, cluster_config())
    return parse_strictly(output)


def test_a_path_to_the_pipeline_file_compiles_the_same_pipeline(compiled, tmp_path):
    output = compile_pipeline(ROOT / "pipelines" / "training.py", tmp_path / "by-path.yaml", cluster_config())
    by_path = parse_strictly(output)
    assert by_path.pipeline_info.name == compiled.pipeline_info.name == "tuneloop-training"
    assert set(by_path.components) == set(compiled.components)


def test_every_stage_is_a_task(compiled):
    tasks = compiled.root.dag.tasks
    assert set(tasks) == {"exit-handler-1", "notify"}
    inner = compiled.components["comp-exit-handler-1"].dag.tasks
    assert {"validate-data", "retrieve-features", "finetune", "compress", "evaluate"} <= set(inner)


def test_registration_sits_under_the_gate(compiled):
    inner = compiled.components["comp-exit-handler-1"].dag.tasks
    assert "register" not in inner
    condition_tasks = [name for name in inner if name.startswith("condition-branches")]
    assert condition_tasks, "the gate is a dsl.If/Else"
    branches = compiled.components[inner[condition_tasks[0]].component_ref.name].dag.tasks
    by_name = {task.task_info.name: task for task in branches.values()}
    blessed, rejected = by_name["blessed"], by_name["rejected"]
    assert blessed.trigger_policy.condition == "inputs.parameter_values['pipelinechannel--evaluate-blessed'] == true"
    assert rejected.trigger_policy.condition.startswith("!(")
    blessed_tasks = compiled.components[blessed.component_ref.name].dag.tasks
    assert {"register", "deploy"} <= set(blessed_tasks)
    assert "register" in blessed_tasks["deploy"].dependent_tasks
    assert "report-rejection" in compiled.components[rejected.component_ref.name].dag.tasks


def test_exit_handler_reports_failures(compiled):
    notify = compiled.root.dag.tasks["notify"]
    assert notify.trigger_policy.strategy == pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED


def test_config_is_the_default_parameter_and_nothing_is_cached(compiled):
    parameters = compiled.root.input_definitions.parameters
    assert set(parameters) == {"config_json", "base_model", "epochs", "learning_rate"}
    assert '"name":"sms"' in parameters["config_json"].default_value.string_value
    inner = compiled.components["comp-exit-handler-1"].dag.tasks
    for name, task in inner.items():
        if not name.startswith("condition"):
            assert not task.caching_options.enable_cache, name


def test_components_use_the_tuneloop_image_without_installs(compiled):
    executors = json_format.MessageToDict(compiled.deployment_spec)["executors"]
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"].startswith("ghcr.io/tuneloop/tuneloop"), name
        assert "pip install" not in " ".join(container["command"]), name
