"""The gate blesses only what passes every check, and fails closed on anything else."""

import json
from pathlib import Path

import pytest

from tests.conftest import make_config
from tuneloop import evaluation
from tuneloop.errors import RegistryError, ServiceUnavailableError
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
    assert outage.value.service == "mlflow" and outage.value.uri == f"http://127.0.0.1:{port}"
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
