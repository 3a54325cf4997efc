"""The monitoring pipeline compiles and parses strictly; retraining sits under the drift condition."""

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from tests.pipelines.conftest import cluster_config
from tuneloop.orchestration import compile_pipeline


def test_monitoring_pipeline_compiles_with_trigger_under_drift(tmp_path):
    output = compile_pipeline("monitoring", tmp_path / "monitoring.yaml", cluster_config())
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(next(yaml.safe_load_all(output.read_text())), spec, ignore_unknown_fields=False)
    assert spec.pipeline_info.name == "tuneloop-monitoring"
    tasks = {}
    for component in spec.components.values():
        for name, task in component.dag.tasks.items():
            tasks[name] = (task, component)
    condition = [task for task, _ in tasks.values() if task.task_info.name == "drift"]
    assert len(condition) == 1 and "monitor-drift-drift" in condition[0].trigger_policy.condition
    branch = spec.components[condition[0].component_ref.name].dag.tasks
    assert {"notify-drift", "trigger-retraining"} <= set(branch)
    assert not tasks["monitor-drift"][0].caching_options.enable_cache
