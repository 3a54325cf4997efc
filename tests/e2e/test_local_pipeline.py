"""The whole training pipeline through kfp.local with the real MiniLM on ~300 example rows."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sms_spam"

pytestmark = pytest.mark.slow


def tuneloop(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tuneloop.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)


def run_local(project_dir):
    return tuneloop("run", "--local", "--config", "tuneloop.yaml", "--pipeline", str(ROOT / "pipelines/training.py"),
                    cwd=project_dir)


def versions(project_dir):
    listed = tuneloop("models", "list", "--json", cwd=project_dir)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project of 200 ham and 100 spam example rows, trained for 3 short epochs."""
    directory = tmp_path_factory.mktemp("sms-e2e")
    labels = pd.read_parquet(EXAMPLE / "data" / "labels.parquet")
    sample = pd.concat([labels[labels.label == "ham"].head(200), labels[labels.label == "spam"].head(100)])
    texts = pd.read_parquet(EXAMPLE / "data" / "texts.parquet")
    (directory / "data").mkdir()
    texts[texts.id.isin(sample.id)].to_parquet(directory / "data" / "texts.parquet", index=False)
    sample.to_parquet(directory / "data" / "labels.parquet", index=False)
    config = yaml.safe_load((EXAMPLE / "tuneloop.yaml").read_text())
    config["name"] = config["registry"]["model_name"] = config["registry"]["experiment"] = "sms-e2e"
    config["training"].update(epochs=3, batch_size=16, max_length=64)
    config["compression"]["variants"] = ["onnx_int8_dynamic"]  # students are built in their own tests
    config["evaluation"]["thresholds"] = {"macro_f1": 0.7}
    # ~45 test rows cannot decide at 95% confidence: this run checks the pipeline, not the statistics
    config["evaluation"]["when_undecided"] = "keep_threshold_only"
    config["validation"].update(min_rows=100, min_rows_per_class=10)
    (directory / "tuneloop.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.mark.ci
def test_pipeline_registers_a_champion(project):
    result = run_local(project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("== tuneloop run"):]
    for expected in ("rows validated", "splits: train", "training: full fine-tuning", "compression: kept",
                     "gate: blessed=True", "registry: sms-e2e version 1, aliases: challenger, champion"):
        assert expected in summary, summary
    [version] = versions(project)
    assert version["aliases"] == ["challenger", "champion"]
    assert version["metrics"]["macro_f1"] >= 0.7


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda labels, texts: labels.assign(label=labels.label.where(labels.index % 7 != 0, "maybe")), "'maybe'"),
        (lambda labels, texts: None, "empty"),
    ],
    ids=["unknown-label", "empty-texts"],
)
def test_bad_data_fails_validation_and_leaves_registry_alone(project, corrupt, message, tmp_path):
    before = versions(project)
    labels_path, texts_path = project / "data" / "labels.parquet", project / "data" / "texts.parquet"
    labels, texts = pd.read_parquet(labels_path), pd.read_parquet(texts_path)
    try:
        broken_labels = corrupt(labels, texts)
        if broken_labels is None:
            texts.assign(text=texts.text.where(texts.index % 4 != 0, "   ")).to_parquet(texts_path, index=False)
        else:
            broken_labels.to_parquet(labels_path, index=False)
        result = run_local(project)
    finally:
        labels.to_parquet(labels_path, index=False)
        texts.to_parquet(texts_path, index=False)
    assert result.returncode != 0
    assert "data validation failed" in result.stderr and message in result.stderr, result.stderr[-2000:]
    assert versions(project) == before
