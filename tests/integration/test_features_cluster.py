"""The cluster feature store on real services: a Feast SQL registry on Postgres, Redis online, S3 sources.

`tuneloop features apply` runs from one working directory; every read runs from another fresh one
with only the config (no shared local disk), and gets the same frame as the local world.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import make_labelled_frame
from tuneloop import features
from tuneloop.cli import cli
from tuneloop.config import load_config
from tuneloop.errors import ConfigError

_numbers = itertools.count()
REGISTRY_ENV, REDIS_ENV = "TEST_FEAST_REGISTRY_URL", "TEST_FEAST_REDIS"


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_labelled_frame(90)


@pytest.fixture
def cluster(tmp_path, monkeypatch, postgres_service, redis_service, s3_service, s3_endpoint, frame):
    """A cluster config on a fresh registry database and S3 prefix, its data uploaded as CSV (so
    `features apply` must prepare a normalised copy on S3); returns a writer of the config into a
    fresh directory."""
    number = next(_numbers)
    prefix = f"s3://tuneloop/features-{number}"
    monkeypatch.setenv(REGISTRY_ENV, postgres_service.create_database(f"feast_{number}"))
    monkeypatch.setenv(REDIS_ENV, redis_service.url + f"/{number % 16}")
    texts, labels = _split(frame)
    texts.to_csv(f"{prefix}/texts.csv", index=False)
    labels.to_csv(f"{prefix}/labels.csv", index=False)
    raw = {
        "name": "sms-spam", "world": "cluster",
        "data": {"texts": f"{prefix}/texts.csv", "labels": f"{prefix}/labels.csv", "classes": ["ham", "spam"]},
        "features": {"project": f"cluster_{number}", "registry_url_env": REGISTRY_ENV,
                     "redis_connection_env": REDIS_ENV, "offline_uri": f"{prefix}/feature_data"},
    }

    def write(name: str, **features_overrides) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        changed = {**raw, "features": {**raw["features"], **features_overrides}}
        (directory / "tuneloop.yaml").write_text(yaml.safe_dump(changed))
        monkeypatch.chdir(directory)  # a pod: its own working directory, nothing of the others'
        return directory / "tuneloop.yaml"

    return write


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    texts = frame[["id", "event_timestamp", "text"]]
    labels = frame[["id", "event_timestamp", "label"]].copy()
    labels["event_timestamp"] += pd.Timedelta(hours=1)
    return texts, labels


def _local_frame(tmp_path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    directory = tmp_path / "local"
    directory.mkdir()
    texts, labels = _split(frame)
    texts.to_csv(directory / "texts.csv", index=False)
    labels.to_csv(directory / "labels.csv", index=False)
    (directory / "tuneloop.yaml").write_text(yaml.safe_dump(
        {"name": "sms-spam", "state_dir": str(directory / "state"),
         "data": {"texts": "texts.csv", "labels": "labels.csv", "classes": ["ham", "spam"]}}))
    features.run(load_config(directory / "tuneloop.yaml"), directory / "dataset")
    return pd.read_parquet(directory / "dataset")


def _apply(config_file: Path, *extra: str):
    result = CliRunner().invoke(cli, ["features", "apply", "--config", str(config_file), *extra])
    assert result.exception is None, result.output
    return result.output


def test_apply_once_then_every_pod_reads_the_same_frame_as_the_local_world(cluster, tmp_path, frame, s3_service):
    before = cluster("pod-0")
    with pytest.raises(ConfigError, match=r"does not hold the definitions.*tuneloop features apply"):
        features.run(load_config(before), tmp_path / "never")

    setup = cluster("setup")  # the set-up step as CI/CD runs it: the command, in its own process
    process = subprocess.run([sys.executable, "-m", "tuneloop.cli", "features", "apply", "--config", str(setup)],
                             capture_output=True, text=True, timeout=300, cwd=setup.parent)
    assert process.returncode == 0, process.stderr[-3000:]
    output = process.stdout
    assert "feature view sms_spam_texts: create" in output and "feature service sms_spam: create" in output
    prepared = [key for key in s3_service.keys("tuneloop") if key.endswith("feature_data/sms_spam_texts.parquet")]
    assert len(prepared) == 1
    assert "registry postgresql+psycopg2://***@127.0.0.1:" in output and ":" + "//tuneloop:" not in output

    assert "unchanged" in _apply(cluster("setup-again"))  # idempotent: the second run changes nothing

    pod = cluster("pod-1")
    summary = features.run(load_config(pod), pod.parent / "dataset")
    cluster_frame = pd.read_parquet(pod.parent / "dataset")
    assert not (pod.parent / ".tuneloop" / "feast" / "registry.db").exists()  # read from Postgres
    pd.testing.assert_frame_equal(cluster_frame, _local_frame(tmp_path, frame))
    assert summary.total_rows == len(frame) and summary.feature_service == "sms_spam"


def test_runs_refuse_a_registry_that_differs_from_the_config(cluster, tmp_path):
    _apply(cluster("setup"))
    changed = cluster("pod", ttl_days=30)
    with pytest.raises(ConfigError) as caught:
        features.run(load_config(changed), tmp_path / "never")
    message = str(caught.value)
    assert "\n" not in message
    assert "sms_spam_texts: update" in message and "tuneloop features apply --config" in message
    assert not (tmp_path / "never").exists()


def test_changed_texts_need_a_new_apply(cluster, tmp_path, frame):
    config_file = cluster("setup")
    _apply(config_file)
    config = load_config(config_file)
    texts, _ = _split(make_labelled_frame(95))
    texts.to_csv(config.data.texts, index=False)
    with pytest.raises(ConfigError, match="was prepared from other texts than data.texts.*features apply"):
        features.run(load_config(cluster("pod")), tmp_path / "never")
    output = _apply(cluster("setup-again"))
    assert "unchanged" in output  # the definitions did not change, only the prepared source
    summary = features.run(load_config(cluster("pod-2")), tmp_path / "dataset")
    assert summary.total_rows == len(frame)  # the 5 new texts have no labels yet


def test_materialised_online_features_from_redis_match_the_local_world(cluster, tmp_path, frame):
    _apply(cluster("setup"), "--materialize", "--until", "2024-02-01T00:00:00+00:00")
    config = load_config(cluster("serving-pod"))
    online = features.online_features(config, ["m00004", "m00007", "nobody"])

    assert list(online["id"]) == ["m00004", "m00007", "nobody"]
    assert online.loc[0, "text"] == frame.loc[4, "text"] and online.loc[1, "text"] == frame.loc[7, "text"]
    assert pd.isna(online.loc[2, "text"])
    expected = features.text_statistics(pd.Series([frame.loc[4, "text"], frame.loc[7, "text"]]))
    for column in features.STATISTIC_COLUMNS:
        assert online.loc[:1, column].astype(float).tolist() == pytest.approx(expected[column].astype(float).tolist())


def test_online_reads_in_a_cluster_never_materialise_themselves(cluster):
    _apply(cluster("setup"))
    with pytest.raises(ConfigError, match="tuneloop features materialize"):
        features.online_features(load_config(cluster("serving-pod")), ["m00001"])


def test_feast_cli_on_the_cluster_flavour_sees_what_features_apply_registered(cluster, tmp_path, monkeypatch):
    import shutil

    config_file = cluster("setup")
    _apply(config_file)
    repo = tmp_path / "project" / "feature_repo"
    shutil.copytree(Path(__file__).resolve().parents[2] / "feature_repo", repo,
                    ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    store_yaml = repo / "cluster" / "feature_store.yaml"
    project = load_config(config_file).features.project
    store_yaml.write_text(store_yaml.read_text().replace("project: tuneloop", f"project: {project}"))
    redis = features.store.redis_connection(load_config(config_file))
    env = {**os.environ, "TUNELOOP_CONFIG": str(config_file),
           "FEAST_REGISTRY_URL": os.environ[REGISTRY_ENV], "FEAST_REDIS_CONNECTION": redis}
    feast = Path(sys.executable).parent / "feast"

    plan = subprocess.run([str(feast), "plan"], cwd=repo / "cluster", env=env, capture_output=True, text=True,
                          timeout=300)
    listed = subprocess.run([str(feast), "feature-services", "list"], cwd=repo / "cluster", env=env,
                            capture_output=True, text=True, timeout=300)

    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "No changes to registry" in plan.stdout, plan.stdout[-3000:]
    assert listed.returncode == 0 and "sms_spam" in listed.stdout, listed.stderr[-2000:]
