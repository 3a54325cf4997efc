"""The gate blesses only what passes every check, and fails closed on anything else."""

import json
from pathlib import Path

import pytest

from tests.conftest import make_config
from tuneloop import evaluation
from tuneloop.evaluation import read_decision
from tuneloop.registry import ChampionModel


class FakeClassifier:
    """Predicts from a table: 'spam' for texts containing a marker, else 'ham'; or a constant."""

    labels = ["ham", "spam"]

    def __init__(self, constant=None, labels=None):
        self.constant = constant
        if labels:
            self.labels = labels

    def predict(self, texts):
        if self.constant:
            return [self.constant] * len(texts)
        return ["spam" if ("WIN" in t or "Free" in t or "URGENT" in t or "won" in t) else "ham" for t in texts]


@pytest.fixture
def classifiers(monkeypatch):
    table = {"good": FakeClassifier(), "all-ham": FakeClassifier("ham")}
    monkeypatch.setattr(evaluation, "load_classifier", lambda directory: table[Path(directory).name])
    return table


def gate(tmp_path, tiny_dataset, compressed="good", champion=None, **evaluation_settings):
    config = make_config(tmp_path, evaluation=evaluation_settings) if evaluation_settings else make_config(tmp_path)
    decision = tmp_path / "decision.json"
    result = evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / compressed, decision,
                            find_champion=lambda cfg, scratch: champion)
    assert json.loads(decision.read_text())["blessed"] is result.blessed
    return result


def test_first_good_model_is_blessed(tmp_path, tiny_dataset, classifiers):
    result = gate(tmp_path, tiny_dataset)
    assert result.blessed
    names = [c.name for c in result.checks]
    assert names == ["test_macro_f1", "compression_macro_f1_loss_points", "champion_comparison"]
    assert result.metrics["macro_f1"] == 1.0 and result.metrics["confusion_matrix"][1][0] == 0


def test_below_threshold_is_not_blessed(tmp_path, tiny_dataset, classifiers):
    result = gate(tmp_path, tiny_dataset, compressed="all-ham")
    assert not result.blessed
    failed = {c.name for c in result.checks if not c.passed}
    assert failed == {"test_macro_f1", "compression_macro_f1_loss_points"}


def test_no_thresholds_fails_closed(tmp_path, tiny_dataset, classifiers):
    result = gate(tmp_path, tiny_dataset, thresholds={})
    assert not result.blessed and result.checks[0].name == "thresholds_configured"


def test_worse_than_champion_is_not_blessed(tmp_path, tiny_dataset, classifiers):
    (tmp_path / "good").mkdir()
    result = gate(tmp_path, tiny_dataset, compressed="all-ham", champion=ChampionModel("3", tmp_path / "good"),
                  thresholds={"accuracy": 0.1}, max_compression_loss_points=100)
    check = result.checks[-1]
    assert check.name == "macro_f1_drop_vs_champion_points" and not check.passed
    assert result.champion_version == "3" and not result.blessed


def test_champion_lookup_error_fails_closed(tmp_path, tiny_dataset, classifiers):
    config = make_config(tmp_path)

    def unreachable(cfg, scratch):
        raise ConnectionError("registry down")

    result = evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json",
                            find_champion=unreachable)
    assert not result.blessed and result.checks[0].name == "gate_error"
    assert "registry down" in result.checks[0].value


def test_unreadable_decision_reads_as_not_blessed(tmp_path):
    assert read_decision(tmp_path / "absent.json")["blessed"] is False
    (tmp_path / "d.json").write_text('{"blessed": "yes"}')
    assert read_decision(tmp_path / "d.json")["blessed"] is False
