"""Bad input through the real CLI: one clear message, a non-zero exit, the registry untouched."""

import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import make_labelled_frame


def tuneloop(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def project(tmp_path):
    frame = make_labelled_frame(150)
    frame.to_csv(tmp_path / "raw.csv", index=False)
    result = tuneloop("init", "--data", "raw.csv", "--text-column", "text", "--label-column", "label",
                      "--id-column", "id", "--timestamp-column", "event_timestamp", "--name", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path


def run_local(project_dir, *extra):
    return tuneloop("run", "--local", "--config", "tuneloop.yaml", *extra, cwd=project_dir)


def assert_registry_empty(project_dir):
    listed = tuneloop("models", "list", "--json", cwd=project_dir)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "[]"


def test_missing_data_file(project):
    (project / "data" / "texts.parquet").unlink()
    result = run_local(project)
    assert result.returncode == 3
    assert "texts file (data.texts) not found" in result.stderr and "texts.parquet" in result.stderr
    assert_registry_empty(project)


def test_run_from_another_directory_finds_the_shipped_pipeline(project, tmp_path_factory):
    """`tuneloop run --local --config my-project/tuneloop.yaml` from anywhere: the shipped training
    pipeline loads (no `pipelines/` in the working directory), then the preflight names the data."""
    (project / "data" / "texts.parquet").unlink()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = tuneloop("run", "--local", "--config", str(project / "tuneloop.yaml"), cwd=elsewhere)
    assert result.returncode == 3, result.stderr
    assert "pipeline file not found" not in result.stderr
    assert "texts file (data.texts) not found" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_unknown_pipeline_name_is_named(project):
    result = run_local(project, "--pipeline", "trainnig")
    assert result.returncode != 0
    assert "pipeline file not found: trainnig (the shipped pipelines are training, monitoring)" in result.stderr
    assert_registry_empty(project)


def test_labels_file_without_label_column(project):
    labels = pd.read_parquet(project / "data" / "labels.parquet").drop(columns=["label"])
    labels.to_parquet(project / "data" / "labels.parquet")
    result = run_local(project)
    assert result.returncode == 3
    assert "has no column 'label'" in result.stderr and "labels.parquet" in result.stderr
    assert "Traceback" not in result.stderr
    assert_registry_empty(project)


def test_unknown_config_key_and_wrong_type(project):
    config = project / "tuneloop.yaml"
    config.write_text(re.sub(r"^  epochs: \d+", "  epochz: 2", config.read_text(), count=1, flags=re.MULTILINE))
    result = run_local(project)
    assert result.returncode == 2 and "training.epochz: unknown key" in result.stderr
    config.write_text(config.read_text().replace("  epochz: 2", "  epochs: two"))
    result = run_local(project)
    assert result.returncode == 2 and "training.epochs: Input should be a valid integer" in result.stderr


def test_base_model_path_that_does_not_exist(project):
    result = run_local(project, "--base-model", str(project / "no-such-model"))
    assert result.returncode == 2
    assert "training.base_model: checkpoint directory does not exist" in result.stderr
    assert_registry_empty(project)


def test_missing_config_and_compile_of_missing_pipeline(project):
    result = tuneloop("models", "list", "--config", "absent.yaml", cwd=project)
    assert result.returncode == 2 and "config file not found: absent.yaml" in result.stderr
    result = tuneloop("compile", "absent.py", "--output", "x.yaml", cwd=project)
    assert result.returncode != 0 and "pipeline file not found: absent.py" in result.stderr
