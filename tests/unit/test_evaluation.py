"""The gate blesses only what passes every check, and fails closed on anything else."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_config
from tuneloop import evaluation
from tuneloop.errors import ConfigError, GateError, RegistryError, ServiceUnavailableError
from tuneloop.evaluation import read_decision
from tuneloop.registry import ChampionModel


class FakeClassifier:
    """Predicts from a table: 'spam' for texts containing a marker, else 'ham'; or a constant."""

    labels = ["ham", "spam"]
    temperature = 1.0

    def __init__(self, constant=None, labels=None):
        self.constant = constant
        if labels:
            self.labels = labels

    def predict(self, texts):
        if self.constant:
            return [self.constant] * len(texts)
        return ["spam" if ("WIN" in t or "Free" in t or "URGENT" in t or "won" in t) else "ham" for t in texts]

    def predict_proba(self, texts):
        return np.array([[0.1, 0.9] if label == "spam" else [0.9, 0.1] for label in self.predict(texts)])


@pytest.fixture
def classifiers(monkeypatch):
    table = {"good": FakeClassifier(), "all-ham": FakeClassifier("ham")}
    monkeypatch.setattr(evaluation, "load_classifier", lambda directory: table[Path(directory).name])
    return table


@pytest.fixture
def weak_baseline(monkeypatch):
    """A baseline that calls everything ham (the real one is tested in test_gate.py)."""
    from tuneloop import baseline

    monkeypatch.setattr(baseline, "fit_predict", lambda train_texts, train_labels, test_texts, seed=0:
                        ["ham"] * len(test_texts))


def gate(tmp_path, tiny_dataset, compressed="good", champion=None, **evaluation_settings):
    config = make_config(tmp_path, evaluation=evaluation_settings) if evaluation_settings else make_config(tmp_path)
    decision = tmp_path / "decision.json"
    result = evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / compressed, decision,
                            find_champion=lambda cfg, scratch: champion)
    assert json.loads(decision.read_text())["blessed"] is result.blessed
    return result


def test_first_good_model_is_blessed_when_it_beats_the_baseline(tmp_path, tiny_dataset, classifiers,
                                                                 weak_baseline):
    result = gate(tmp_path, tiny_dataset, confidence=0.9)
    assert result.blessed
    names = [c.name for c in result.checks]
    assert names == ["compression_macro_f1_loss_points", "macro_f1_gain_vs_baseline_points",
                     "accuracy_vs_baseline_points"]
    gain = result.checks[1]
    assert gain.status == "passed" and gain.low > 0 and gain.confidence == 0.9
    assert result.metrics["macro_f1"] == 1.0 and result.metrics["confusion_matrix"][1][0] == 0


def test_below_threshold_is_not_blessed(tmp_path, tiny_dataset, classifiers, weak_baseline):
    result = gate(tmp_path, tiny_dataset, compressed="all-ham", thresholds={"macro_f1": 0.9})
    assert not result.blessed
    failed = {c.name for c in result.checks if not c.passed}
    assert failed == {"test_macro_f1", "compression_macro_f1_loss_points", "macro_f1_gain_vs_baseline_points"}
    threshold = result.checks[0]
    assert threshold.status == "failed" and threshold.high < 0.9


def test_nothing_to_decide_on_fails_closed(tmp_path, tiny_dataset, classifiers):
    result = gate(tmp_path, tiny_dataset, thresholds={}, baseline=False)
    assert not result.blessed and result.checks[-1].name == "quality_bar_configured"


def test_worse_than_champion_is_not_blessed(tmp_path, tiny_dataset, classifiers):
    (tmp_path / "good").mkdir()
    result = gate(tmp_path, tiny_dataset, compressed="all-ham", champion=ChampionModel("3", tmp_path / "good"),
                  thresholds={"accuracy": 0.1}, max_compression_loss_points=100)
    check = next(c for c in result.checks if c.name == "macro_f1_drop_vs_champion_points")
    assert not check.passed and check.status == "failed" and check.low > 1.0
    assert result.champion_version == "3" and not result.blessed


def test_an_equal_challenger_on_few_rows_is_undecided_and_names_the_rows_it_needs(tmp_path, tiny_dataset,
                                                                                  classifiers, monkeypatch):
    """Champion and challenger disagree on a few rows each way: equal on average, too few rows to tell."""
    (tmp_path / "good").mkdir()
    test_rows = evaluation.load_split(tiny_dataset, "test")
    flip_challenger, flip_champion = set(test_rows["text"][:2]), set(test_rows["text"][2:4])

    class Flipping(FakeClassifier):
        def __init__(self, flips):
            super().__init__()
            self.flips = flips

        def predict(self, texts):
            right = super().predict(texts)
            return [("ham" if y == "spam" else "spam") if t in self.flips else y for t, y in zip(texts, right)]

    table = {"challenger": Flipping(flip_challenger), "champion": Flipping(flip_champion), "good": FakeClassifier()}
    monkeypatch.setattr(evaluation, "load_classifier", lambda directory: table[Path(directory).name])
    (tmp_path / "champion").mkdir()
    settings = {"max_compression_loss_points": 100, "max_drop_vs_champion_points": 1.0}
    rejected = gate(tmp_path, tiny_dataset, compressed="challenger", champion=ChampionModel("2", tmp_path / "champion"),
                    **settings)
    drop = next(c for c in rejected.checks if c.name == "macro_f1_drop_vs_champion_points")
    assert drop.status == "undecided" and not drop.passed and not rejected.blessed
    assert drop.rows_needed > drop.rows == len(test_rows)
    assert f"about {drop.rows_needed} rows would" in drop.note and "when_undecided: reject" in drop.note
    kept = gate(tmp_path, tiny_dataset, compressed="challenger", champion=ChampionModel("2", tmp_path / "champion"),
                when_undecided="keep_threshold_only", **settings)
    drop = next(c for c in kept.checks if c.name == "macro_f1_drop_vs_champion_points")
    assert drop.status == "undecided" and drop.passed and drop.value <= 1.0 and kept.blessed


def test_a_champion_scored_on_other_rows_is_refused_by_name(tmp_path, tiny_dataset, classifiers, monkeypatch):
    class Short(FakeClassifier):
        def predict(self, texts):
            return super().predict(texts)[:-1]

    classifiers["short"] = Short()
    (tmp_path / "short").mkdir()
    result = gate(tmp_path, tiny_dataset, champion=ChampionModel("4", tmp_path / "short"))
    assert not result.blessed and result.checks[-1].name == "gate_error"
    assert "champion version 4 returned" in result.checks[-1].value and "refusing to compare" in result.checks[-1].value
    config = make_config(tmp_path)
    challenger = evaluation.ScoredRows("the challenger", ["a", "b", "c"], ["ham", "spam", "ham"])
    other = evaluation.ScoredRows("champion version 4", ["a", "b", "z"], ["ham", "spam", "ham"])
    with pytest.raises(GateError, match=r"champion version 4 was scored on 3 test rows.*\['z'\].*different rows"):
        evaluation.pair_rows(challenger, other, config)
    shuffled = evaluation.ScoredRows("champion version 4", ["c", "a", "b"], ["spam", "ham", "ham"])
    assert evaluation.pair_rows(challenger, shuffled, config).tolist() == [0, 0, 1]


def test_every_check_carries_its_interval_in_the_decision(tmp_path, tiny_dataset, classifiers, weak_baseline):
    gate(tmp_path, tiny_dataset, thresholds={"accuracy": 0.5})
    decision = json.loads((tmp_path / "decision.json").read_text())
    for check in decision["checks"]:
        assert {"name", "value", "threshold", "passed", "low", "high", "confidence"} <= set(check)
        assert check["low"] <= check["value"] <= check["high"] and check["confidence"] == 0.95
    assert decision["slices"] and decision["calibration"]["ece"] >= 0.0


def test_a_slice_column_that_does_not_exist_is_a_config_error(tmp_path, tiny_dataset, classifiers):
    import pandas as pd

    pd.DataFrame({"id": ["m00000"], "event_timestamp": [pd.Timestamp("2024-01-01", tz="UTC")],
                  "text": ["x"]}).to_parquet(tmp_path / "texts.parquet")
    config = make_config(tmp_path, evaluation={"slices": {"columns": ["channel"]}})
    with pytest.raises(ConfigError, match=r"evaluation.slices.columns: column 'channel' is in neither the dataset "
                                          r"nor the texts source"):
        evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json",
                       find_champion=lambda cfg, scratch: None)
    assert not (tmp_path / "d.json").exists()


def test_slices_from_a_source_column_small_and_empty_slices_are_reported_not_gated(tmp_path, tiny_dataset,
                                                                                   labelled_frame, classifiers,
                                                                                   weak_baseline):
    texts = labelled_frame[["id", "event_timestamp", "text"]].copy()
    texts["channel"] = ["web" if i % 4 else "app" for i in range(len(texts))]
    texts.to_parquet(tmp_path / "texts.parquet")
    rules = {"*": {"min_macro_f1": 0.99}, "channel=fax": {"min_macro_f1": 0.5}}
    result = gate(tmp_path, tiny_dataset, slices={"columns": ["channel"], "min_rows": 15, "rules": rules})
    table = {piece.name: piece for piece in result.slices}
    test_rows = len(evaluation.load_split(tiny_dataset, "test"))
    assert table["channel=web"].rows + table["channel=app"].rows == test_rows
    assert table["channel=app"].rows < 15 and not table["channel=app"].gated
    assert "reported, not gated" in table["channel=app"].note
    assert table["channel=fax"].rows == 0 and "reported, not gated" in table["channel=fax"].note
    assert table["length=1001+ chars"].rows == 0 and not table["length=1001+ chars"].gated
    gated = [c for c in result.checks if c.name.startswith("slice[")]
    assert [c.name for c in gated] == [f"slice[{p.name}]_macro_f1" for p in result.slices if p.gated]
    assert "slice[channel=web]_macro_f1" in {c.name for c in gated}
    assert all(c.low is not None for c in gated)


def test_confidence_outside_the_open_interval_is_refused(tmp_path):
    for value in (0.5, 1.0, 0.3):
        with pytest.raises(ConfigError, match="evaluation.confidence"):
            make_config(tmp_path, evaluation={"confidence": value})


def test_unreachable_champion_lookup_is_an_outage_not_a_verdict(tmp_path, tiny_dataset, classifiers):
    config = make_config(tmp_path)

    def unreachable(cfg, scratch):
        raise ConnectionError("registry down")

    with pytest.raises(ServiceUnavailableError, match="registry down") as outage:
        evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json",
                       find_champion=unreachable)
    assert outage.value.service == "mlflow" and outage.value.exit_code == 75
    assert not (tmp_path / "d.json").exists()


def test_champion_with_missing_files_fails_closed(tmp_path, tiny_dataset, classifiers):
    config = make_config(tmp_path)

    def files_gone(cfg, scratch):
        raise RegistryError("champion version 3: nothing is stored at s3://bucket/3/model")

    result = evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json",
                            find_champion=files_gone)
    assert not result.blessed and result.checks[0].name == "gate_error"
    assert "nothing is stored" in result.checks[0].value
    assert read_decision(tmp_path / "d.json")["blessed"] is False


def test_corrupt_champion_fails_closed(tmp_path, tiny_dataset, tiny_checkpoint):
    """A champion whose files are garbage cannot be scored: a decision (not blessed), not a retry."""
    import shutil

    from tests.conftest import export_compressed_fp32

    candidate = export_compressed_fp32(tiny_checkpoint, tmp_path / "candidate")
    corrupt = tmp_path / "champion"
    shutil.copytree(candidate, corrupt)
    (corrupt / "model.onnx").write_bytes(b"not an onnx graph")
    config = make_config(tmp_path, evaluation={"thresholds": {"accuracy": 0.0}, "max_compression_loss_points": 100})
    result = evaluation.run(config, tiny_dataset, tiny_checkpoint, candidate, tmp_path / "d.json",
                            find_champion=lambda cfg, scratch: ChampionModel("7", corrupt))
    assert not result.blessed and result.checks[-1].name == "gate_error"
    assert json.loads((tmp_path / "d.json").read_text())["blessed"] is False


def test_registry_on_a_closed_port_raises_quickly_and_decides_nothing(tmp_path, tiny_dataset, classifiers,
                                                                       monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:hunter2@127.0.0.1:{port}")
    config = make_config(tmp_path, registry={"retry_attempts": 2, "retry_wait_s": 0})
    with pytest.raises(ServiceUnavailableError) as outage:
        evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json")
    assert outage.value.service == "mlflow" and outage.value.uri == f"http://***@127.0.0.1:{port}"
    assert "hunter2" not in str(outage.value)
    assert not (tmp_path / "d.json").exists()


def test_unreadable_decision_reads_as_not_blessed(tmp_path):
    assert read_decision(tmp_path / "absent.json")["blessed"] is False
    (tmp_path / "d.json").write_text('{"blessed": "yes"}')
    assert read_decision(tmp_path / "d.json")["blessed"] is False


def test_mlflow_server_down_during_evaluate_is_retryable_and_decides_nothing(tmp_path, tiny_dataset,
                                                                             classifiers, mlflow_server):
    """The rehearsal's guarantee 7 in small: a stopped MLflow server fails the step, decides nothing."""
    config = make_config(tmp_path, registry={"tracking_uri": mlflow_server.url, "retry_attempts": 2,
                                             "retry_wait_s": 0})
    mlflow_server.stop()
    try:
        with pytest.raises(ServiceUnavailableError, match=f"mlflow unreachable at {mlflow_server.url}"):
            evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json")
    finally:
        mlflow_server.start()
    assert not (tmp_path / "d.json").exists()


def test_champion_whose_files_are_gone_is_a_decision_on_a_real_registry(tmp_path, tiny_dataset, classifiers):
    """The registry answers, but the champion's model files were deleted: not blessed, not a retry."""
    import shutil

    from tuneloop import registry
    from tuneloop.artifacts import write_metadata

    config = make_config(tmp_path, registry={"retry_attempts": 2, "retry_wait_s": 0})
    compressed = tmp_path / "compressed"
    write_metadata(compressed, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                                "labels": ["ham", "spam"], "base_model": "tiny"})
    registered = registry.register(config, compressed, {"blessed": True, "checks": []}, tiny_dataset)
    source = registry.client(config).get_model_version(config.registry.model_name, registered.version).source
    shutil.rmtree(source.removeprefix("file://"))
    result = evaluation.run(config, tiny_dataset, tmp_path / "good", tmp_path / "good", tmp_path / "d.json")
    assert not result.blessed and result.checks[-1].name == "gate_error"
    assert f"champion version {registered.version}: nothing is stored at" in result.checks[-1].value
    assert read_decision(tmp_path / "d.json")["blessed"] is False


def test_the_summary_shows_each_interval_and_the_slice_table(tmp_path, tiny_dataset, classifiers, weak_baseline):
    from tuneloop.summary import gate_lines

    result = gate(tmp_path, tiny_dataset, thresholds={"macro_f1": 0.5})
    lines = gate_lines(json.loads((tmp_path / "decision.json").read_text()))
    text = "\n".join(lines)
    threshold = result.checks[0]
    assert f"[pass] test_macro_f1: {threshold.value} [{threshold.low}, {threshold.high}] at 95% (threshold 0.5)" in text
    assert "[info] accuracy_vs_baseline_points" in text and "McNemar" in text
    assert "slices:" in lines and any(line.lstrip().startswith("has_url=no") for line in lines)
    assert any(line.startswith("calibration: test ECE") for line in lines)
    metrics = evaluation.metric_values(result)
    assert metrics["gate_test_macro_f1_low"] == threshold.low and metrics["slice_has_url_no_rows"] > 0
