"""The config loads strictly and names the bad field."""

from pathlib import Path

import pytest

from tuneloop.config import PRETRAINED_PACKAGE_MODEL, load_config, parse_config, resolve_base_model
from tuneloop.errors import ConfigError

MINIMAL = {"name": "demo", "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["ham", "spam"]}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tuneloop.yaml"
    path.write_text(text)
    return path


def test_minimal_config_fills_defaults_and_resolves_paths(tmp_path):
    path = write(tmp_path, "name: demo\ndata: {texts: data/t.parquet, labels: l.parquet, classes: [a, b]}\n")
    config = load_config(path)
    assert config.data.texts == str((tmp_path / "data/t.parquet").resolve())
    assert config.training.base_model == PRETRAINED_PACKAGE_MODEL
    assert config.evaluation.thresholds == {} and config.evaluation.baseline and config.evaluation.confidence == 0.95
    assert config.state_dir.is_absolute()


def test_unknown_key_names_its_path(tmp_path):
    path = write(tmp_path, "name: demo\ndata: {texts: t, labels: l, classes: [a, b]}\ntraining: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"training\.epochz: unknown key") as raised:
        load_config(path)
    assert raised.value.field == "training.epochz"


def test_wrong_type_names_its_path(tmp_path):
    path = write(tmp_path, "name: demo\ndata: {texts: t, labels: l, classes: [a, b]}\ntraining: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"training\.epochs: Input should be a valid integer"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="features.split"):
        parse_config({**MINIMAL, "features": {"split": {"validation": 0.6, "test": 0.5}}}, source="t")
    with pytest.raises(ConfigError, match="data.classes"):
        parse_config({**MINIMAL, "data": {**MINIMAL["data"], "classes": ["a", "a"]}}, source="t")
    with pytest.raises(ConfigError, match="evaluation.thresholds"):
        parse_config({**MINIMAL, "evaluation": {"thresholds": {"macro_f1": 90}}}, source="t")


def test_json_round_trip_for_pipeline_parameter():
    config = parse_config(MINIMAL, source="t")
    assert type(config).from_json(config.to_json()) == config


def test_base_model_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="training.base_model: checkpoint directory does not exist"):
        resolve_base_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"))
    assert (resolve_base_model(PRETRAINED_PACKAGE_MODEL) / "config.json").is_file()


def test_retraining_runs_the_shipped_training_pipeline_by_default():
    config = parse_config(MINIMAL, source="test")
    assert config.monitoring.training_pipeline_file == "training"
    deploy_secrets = [s for s in config.kubeflow.secrets if s.applies_to("deploy")]
    assert ("tuneloop-serving", "api-key", config.deployment.api_key_env) in {(s.secret, s.key, s.env)
                                                                              for s in deploy_secrets}
    assert all(s.steps is None or s.steps for s in config.kubeflow.secrets)
