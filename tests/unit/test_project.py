"""`tuneloop init` turns a labelled file into a project the config loader accepts."""

import pandas as pd
import pytest

from tuneloop.config import load_config
from tuneloop.errors import ConfigError, DataError
from tuneloop.project import init_project, stable_text_id
from tuneloop.world import cluster_problems


def sms_like_csv(tmp_path, rows):
    path = tmp_path / "raw.csv"
    pd.DataFrame(rows, columns=["spam", "text"]).to_csv(path)
    return path


def test_init_derives_ids_timestamps_and_drops_duplicates(tmp_path):
    data = sms_like_csv(tmp_path, [(0, "hi there"), (1, "WIN cash"), (0, "hi there"), (0, "lunch?"), (1, "lunch?")])
    summary = init_project(data, text_column="text", label_column="spam", label_names=["ham", "spam"],
                           name="sms", directory=tmp_path / "project")
    assert summary.dropped_duplicates == 1 and summary.dropped_conflicting == 2
    assert summary.classes == ["ham", "spam"]
    texts = pd.read_parquet(summary.texts_path)
    labels = pd.read_parquet(summary.labels_path)
    assert list(texts.columns) == ["id", "event_timestamp", "text"]
    assert list(labels.columns) == ["id", "event_timestamp", "label"]
    assert texts["id"].tolist() == [stable_text_id("hi there"), stable_text_id("WIN cash")]
    assert (labels["event_timestamp"] > texts["event_timestamp"]).all()
    assert str(texts["event_timestamp"].dt.tz) == "UTC"
    config = load_config(summary.config_path)
    assert config.data.classes == ["ham", "spam"] and config.registry.model_name == "sms"
    assert config.data.texts == str(summary.texts_path.resolve())


def test_init_keeps_given_ids_and_timestamps_multiclass(tmp_path):
    frame = pd.DataFrame({"key": [3, 1, 2], "when": ["2024-05-01", "2024-05-02", "2024-05-03"],
                          "body": ["a", "b", "c"], "topic": ["x", "y", "z"]})
    path = tmp_path / "raw.parquet"
    frame.to_parquet(path)
    summary = init_project(path, text_column="body", label_column="topic", id_column="key",
                           timestamp_column="when", directory=tmp_path)
    texts = pd.read_parquet(summary.texts_path)
    assert texts["id"].tolist() == ["3", "1", "2"]
    assert texts["event_timestamp"].iloc[0] == pd.Timestamp("2024-05-01", tz="UTC")
    assert summary.classes == ["x", "y", "z"]


def test_init_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        init_project(tmp_path / "absent.csv", text_column="text", label_column="spam", directory=tmp_path)
    data = sms_like_csv(tmp_path, [(0, "hi")])
    with pytest.raises(DataError, match="no column 'label'"):
        init_project(data, text_column="text", label_column="label", directory=tmp_path)
    with pytest.raises(ConfigError, match="--label-names gives 3 names"):
        init_project(data, text_column="text", label_column="spam", label_names=["a", "b", "c"], directory=tmp_path)
    init_project(data, text_column="text", label_column="spam", directory=tmp_path)
    with pytest.raises(ConfigError, match="exists already"):
        init_project(data, text_column="text", label_column="spam", directory=tmp_path)


def test_init_writes_a_local_world_config_that_compile_would_refuse(tmp_path):
    """The init config is the zero-set-up local world, with the shipped training pipeline for retraining;
    switched to world: cluster, every pod-local field is named."""
    data = sms_like_csv(tmp_path, [(0, "hi there"), (1, "WIN cash"), (0, "lunch?")])
    summary = init_project(data, text_column="text", label_column="spam", label_names=["ham", "spam"],
                           name="sms", directory=tmp_path / "project")
    config = load_config(summary.config_path)
    assert config.world == "local" and config.state.database_url_env is None
    assert (config.monitoring.trigger, config.monitoring.ledger) == ("local", "database")
    assert config.monitoring.training_pipeline_file == "training"
    text = summary.config_path.read_text(encoding="utf-8").replace("world: local", "world: cluster")
    summary.config_path.write_text(text, encoding="utf-8")
    fields = {problem.split(":", 1)[0] for problem in cluster_problems(load_config(summary.config_path))}
    assert {"data.texts", "data.labels", "deployment.prediction_log_uri", "registry.tracking_uri",
            "state.database_url_env", "monitoring.trigger"} <= fields
