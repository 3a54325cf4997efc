"""`tuneloop compile --config` takes only a cluster config whose shared state lives in services.

Each field that :func:`tuneloop.world.cluster_problems` can name gets its own refusal: one line
naming the field and the value it needs, a non-zero exit, and no YAML written. Compiling without a
config (the defaults) and compiling the k8s ConfigMap's config both work.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.pipelines.conftest import K8S_CONFIG, cluster_config, cluster_raw, k8s_config
from tuneloop.config import parse_config
from tuneloop.errors import ConfigError
from tuneloop.orchestration import compile_pipeline
from tuneloop.world import cluster_problems

POD_LOCAL = {
    "world": ({"world": "local"}, "set world: cluster"),
    "data.texts": ({"data": {"texts": "/data/texts.parquet"}}, "object-store URI"),
    "data.labels": ({"data": {"labels": "data/labels.parquet"}}, "object-store URI"),
    "features.offline_uri": ({"features": {"offline_uri": None}}, "object-store URI"),
    "deployment.prediction_log_uri": ({"deployment": {"prediction_log_uri": "/var/log/predictions"}},
                                      "object-store URI"),
    "registry.tracking_uri": ({"registry": {"tracking_uri": "sqlite:///mlflow.db"}}, "http(s)://"),
    "state.database_url_env": ({"state": {"database_url_env": None}}, "Postgres URL"),
    "features.registry_url_env": ({"features": {"registry_url_env": None}}, "SQL registry URL"),
    "features.redis_connection_env": ({"features": {"redis_connection_env": None}}, "Redis connection"),
    "monitoring.trigger": ({"monitoring": {"trigger": "local"}}, "'kubeflow'"),
    "alerts.jsonl": ({"alerts": {"jsonl": "alerts.jsonl"}}, "shared state database"),
    "training.checkpoint_uri": ({"training": {"checkpoint_uri": "/tmp/checkpoints"}}, "object-store URI"),
    "training.trainjob.model_uri": ({"training": {"backend": "trainjob", "trainjob": {"model_uri": "models"}}},
                                    "object-store URI"),
    "tuning.storage_url_env": ({"tuning": {"in_pipeline": True, "storage": "study.db"}}, "shared Postgres URL"),
}
"""Field -> (a pod-local value for it, what the refusal says it needs)."""


def tuneloop(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_every_field_cluster_problems_names_has_a_refusal_test():
    """Guard: a field added to cluster_problems without a refusal test here fails this test."""
    everything_local = cluster_raw(**{section: value for field, (change, _) in POD_LOCAL.items()
                                      if field != "world" for section, value in change.items()})
    everything_local["features"] = {**everything_local["features"], "offline_uri": None, "registry_url_env": None,
                                    "redis_connection_env": None}
    everything_local["data"] = {**everything_local["data"], "texts": "t.parquet", "labels": "l.parquet"}
    everything_local["training"] = {"checkpoint_uri": None, "backend": "trainjob", "trainjob": {"model_uri": "models"}}
    named = {problem.split(":", 1)[0] for problem in cluster_problems(parse_config(everything_local, source="t"))}
    assert named == set(POD_LOCAL) - {"world"}
    assert cluster_problems(cluster_config()) == []


@pytest.mark.parametrize("field", sorted(POD_LOCAL))
def test_compile_refuses_one_pod_local_field(field, tmp_path):
    change, needed = POD_LOCAL[field]
    config = cluster_config(**change)
    output = tmp_path / "training.yaml"
    with pytest.raises(ConfigError) as raised:
        compile_pipeline("training", output, config)
    header, *problems = str(raised.value).splitlines()
    assert header.startswith("cannot compile for a cluster: 1 field(s)")
    assert len(problems) == 1 and problems[0].startswith(f"  - {field}: "), problems
    assert needed in problems[0]
    assert raised.value.field == field
    assert not output.exists()


def test_cli_refuses_a_mixed_config_one_line_per_field(tmp_path):
    raw = cluster_raw(deployment={"prediction_log_uri": "predictions"}, monitoring={"trigger": "local"})
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = tuneloop("compile", "training", "--output", "out.yaml", "--config", "mixed.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: cannot compile for a cluster: 2 field(s) would keep shared state on one pod:"
    assert [line.split(":", 1)[0].strip(" -") for line in lines[1:]] == [
        "deployment.prediction_log_uri", "monitoring.trigger"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out.yaml").exists()


def test_cli_compiles_both_shipped_pipelines_by_name_without_a_config(tmp_path):
    for name in ("training", "monitoring"):
        result = tuneloop("compile", name, "--output", f"{name}.yaml", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        spec = next(yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text(encoding="utf-8")))
        assert spec["pipelineInfo"]["name"] == f"tuneloop-{name}"
        assert "defaultValue" not in spec["root"]["inputDefinitions"]["parameters"]["config_json"]


def test_cli_names_an_unknown_pipeline(tmp_path):
    result = tuneloop("compile", "trainng", "--output", "x.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "error: pipeline file not found: trainng (the shipped pipelines are training, monitoring)")


def test_the_k8s_config_map_config_compiles(tmp_path):
    """`make compile` bakes k8s/base/config/tuneloop.yaml into both pipelines."""
    assert cluster_problems(k8s_config()) == []
    for name in ("training", "monitoring"):
        result = tuneloop("compile", name, "--output", f"{name}.yaml", "--config", str(K8S_CONFIG), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        spec = next(yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text(encoding="utf-8")))
        baked = spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
        assert '"world":"cluster"' in baked and '"prediction_log_uri":"s3://' in baked


def test_unset_checkpoints_are_pod_local_and_a_pod_backend_ignores_the_trainjob_model_uri():
    """Unset, checkpoints go under the pod's state_dir: a retried finetune could not resume. The TrainJob's
    model_uri only matters with backend: trainjob; tuning storage only when the search is in the pipeline."""
    unset = cluster_raw(training={"checkpoint_uri": None})
    assert cluster_problems(parse_config(unset, source="t")) == [(
        "training.checkpoint_uri: '<state_dir>/checkpoints' is pod-local, so a retried finetune (a new pod) cannot "
        "resume; it needs an object-store URI (s3://bucket/checkpoints)")]
    assert cluster_problems(cluster_config(training={"trainjob": {"model_uri": "models"}})) == []
    assert cluster_problems(cluster_config(tuning={"storage": "study.db"})) == []
