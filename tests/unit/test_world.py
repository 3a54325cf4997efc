"""The two worlds: credentials never ride in a URI, and a cluster replica refuses pod-local state."""

import pytest
import yaml

from tuneloop.config import load_config
from tuneloop.errors import ConfigError
from tuneloop.serving import load_serving_config
from tuneloop.world import cluster_problems

PASSWORD = "hunter2-secret"


def write_config(tmp_path, **sections):
    raw = {"name": "demo", "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["a", "b"]}}
    raw.update(sections)
    path = tmp_path / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("sections, field", [
    ({"registry": {"tracking_uri": f"http://admin:{PASSWORD}@mlflow:5000"}}, "registry.tracking_uri"),
    ({"deployment": {"prediction_log_uri": f"s3://key:{PASSWORD}@bucket/log"}}, "deployment.prediction_log_uri"),
    ({"features": {"offline_uri": f"s3://key:{PASSWORD}@bucket/feast"}}, "features.offline_uri"),
])
def test_credentials_in_a_uri_are_refused_without_echoing_them(tmp_path, sections, field):
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, **sections))
    message = str(refused.value)
    assert field in message and "Secret" in message
    assert PASSWORD not in message


def test_a_local_config_is_one_problem_for_a_cluster(tmp_path):
    config = load_config(write_config(tmp_path))
    assert cluster_problems(config) == [
        "world: 'local' keeps all shared state on one machine; set world: cluster to run on Kubeflow"
    ]


def test_a_cluster_replica_refuses_a_pod_local_prediction_log(tmp_path):
    path = write_config(tmp_path, world="cluster", deployment={"prediction_log_uri": "predictions"})
    with pytest.raises(ConfigError) as refused:
        load_serving_config({"TUNELOOP_CONFIG": str(path), "TUNELOOP_WORKDIR": str(tmp_path)})
    assert "cannot serve for a cluster" in str(refused.value)
    assert "deployment.prediction_log_uri: " in str(refused.value)
