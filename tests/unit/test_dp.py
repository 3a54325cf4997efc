"""DP-SGD fine-tuning with Opacus (tuneloop.dp): spent epsilon recorded, settings it cannot honour refused,
the gate's epsilon check."""

from __future__ import annotations

import json

import pytest

from tests.unit.training_helpers import train_config
from tuneloop import dp, training
from tuneloop.config import TrainingConfig
from tuneloop.errors import TrainingError


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dp_finetune_records_the_spent_epsilon(tmp_path, tiny_checkpoint, tiny_dataset, method):
    config = train_config(tmp_path, tiny_checkpoint, method=method, learning_rate=1e-3, epochs=2,
                          privacy={"dp": True, "target_epsilon": 3.0, "max_grad_norm": 0.5})
    output = tmp_path / "model"
    summary = training.run(config, tiny_dataset, output)
    metadata = json.loads((output / "tuneloop.json").read_text())
    record = metadata["privacy"]
    assert record["dp"] is True and record["mechanism"] == "DP-SGD (Opacus)"
    # the accountant spends most of the budget over the planned epochs, never more
    assert 1.5 < record["epsilon"] <= 3.0 and record["max_grad_norm"] == 0.5 and record["noise_multiplier"] > 0.3
    assert record["delta"] == pytest.approx(1 / (10 * summary.train_rows))
    assert metadata["metrics"]["epsilon"] == record["epsilon"]
    assert summary.to_metrics()["dp_epsilon"] == pytest.approx(record["epsilon"], abs=1e-3)  # the KFP Metrics
    epsilons = [epoch["epsilon"] for epoch in metadata["metrics"]["history"]]
    assert len(epsilons) == 2 and epsilons[0] < epsilons[1] == pytest.approx(record["epsilon"], abs=1e-3)
    assert not list(output.glob("*.bin"))


def test_a_non_private_run_says_so(tmp_path, tiny_checkpoint, tiny_dataset):
    output = tmp_path / "model"
    training.run(train_config(tmp_path, tiny_checkpoint), tiny_dataset, output)
    metadata = json.loads((output / "tuneloop.json").read_text())
    assert metadata["privacy"] == {"dp": False} and "epsilon" not in metadata["metrics"]
    assert "tuneloop.text_privacy" not in metadata  # the tiny frame predates the record


def test_the_training_frames_text_privacy_travels_into_the_model(tmp_path, tiny_dataset):
    import pandas as pd

    from tuneloop.config import PrivacyConfig
    from tuneloop.privacy import TEXT_PRIVACY_KEY, text_privacy_record

    frame = pd.read_parquet(tiny_dataset)
    frame.attrs[TEXT_PRIVACY_KEY] = text_privacy_record(PrivacyConfig(training="mask"))
    frame.to_parquet(tmp_path / "masked.parquet", index=False)
    metadata = dp.with_privacy({"metrics": {}}, tmp_path / "masked.parquet", None)
    assert metadata[TEXT_PRIVACY_KEY]["training"] == "mask" and metadata["privacy"] == {"dp": False}


@pytest.mark.parametrize("overrides, field, words", [
    ({"processes": 2}, "training.processes", "runs in one process"),
    ({"gradient_accumulation": 2}, "training.gradient_accumulation", "gradient_accumulation must be 1"),
    ({"precision": "fp16"}, "training.precision", "precision fp16 is not supported"),
    ({"batch_size": 500}, "training.batch_size", "batch_size (500) below the training rows (100)"),
    ({"privacy": {"dp": True, "delta": 0.05}}, "training.privacy.delta", "must be below 1 / training rows"),
])
def test_settings_dp_sgd_cannot_honour_are_named(overrides, field, words):
    settings = TrainingConfig(**{"privacy": {"dp": True}, **overrides})
    with pytest.raises(TrainingError) as caught:
        dp.check_settings(settings, train_rows=100)
    assert caught.value.field == field and words in str(caught.value) and "\n" not in str(caught.value)


def test_a_budget_too_small_for_the_epochs_is_refused_naming_target_epsilon():
    settings = TrainingConfig(epochs=50, batch_size=50, privacy={"dp": True, "target_epsilon": 0.001})
    with pytest.raises(TrainingError) as caught:
        dp.noise_multiplier(settings, train_rows=100)
    assert caught.value.field == "training.privacy.target_epsilon"
    assert "cannot be met with 50 epochs at sample rate 0.5000" in str(caught.value)


def test_bad_dp_config_values_fail_at_load(tmp_path):
    from tests.conftest import make_config
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match="training.privacy.target_epsilon"):
        make_config(tmp_path, training={"privacy": {"dp": True, "target_epsilon": 0}})
    with pytest.raises(ConfigError, match="training.privacy.noise: unknown key"):
        make_config(tmp_path, training={"privacy": {"dp": True, "noise": 1.0}})


def test_gate_epsilon_check_fails_closed():
    assert dp.epsilon_check({"privacy": {"dp": True, "epsilon": 2.9}}, None) is None
    assert dp.epsilon_check({"privacy": {"dp": True, "epsilon": 2.9}}, 3.0)["passed"] is True
    assert dp.epsilon_check({"privacy": {"dp": True, "epsilon": 7.5}}, 3.0) == {
        "name": "dp_epsilon", "value": 7.5, "threshold": 3.0, "passed": False}
    assert dp.epsilon_check({"privacy": {"dp": False}}, 3.0)["passed"] is False
    assert dp.epsilon_check({}, 3.0)["passed"] is False


@pytest.mark.parametrize("record, blessed", [({"dp": True, "epsilon": 2.5}, True), ({"dp": True, "epsilon": 8.0}, False),
                                             ({"dp": False}, False)])
def test_the_gate_requires_privacy_max_epsilon(tmp_path, tiny_dataset, monkeypatch, record, blessed):
    from pathlib import Path

    from tests.conftest import make_config
    from tuneloop import evaluation
    from tuneloop.artifacts import write_metadata

    class Perfect:
        labels = ["ham", "spam"]

        def predict(self, texts):
            truth = pd.read_parquet(tiny_dataset).set_index("text")["label"]
            return [truth[text] for text in texts]

        def predict_proba(self, texts, batch_size=32):
            import numpy as np

            return np.array([[0.0, 1.0] if label == "spam" else [1.0, 0.0] for label in self.predict(texts)])

    import pandas as pd

    monkeypatch.setattr(evaluation, "load_classifier", lambda directory: Perfect())
    write_metadata(tmp_path / "model", {"kind": "model", "labels": ["ham", "spam"], "privacy": record})
    config = make_config(tmp_path, privacy={"max_epsilon": 3.0})
    result = evaluation.run(config, tiny_dataset, tmp_path / "model", tmp_path / "compressed", tmp_path / "d.json",
                            find_champion=lambda cfg, scratch: None)
    check = next(c for c in result.checks if c.name == "dp_epsilon")
    assert (check.value, check.threshold) == (record.get("epsilon"), 3.0)
    assert check.passed is blessed
    if not blessed:  # (with 27 test rows the statistical gate blesses nothing else either)
        assert result.blessed is False
    assert Path(tmp_path / "d.json").is_file()


def test_the_run_summary_shows_the_spent_epsilon(tmp_path):
    from types import SimpleNamespace

    from tuneloop import summary
    from tuneloop.artifacts import write_metadata

    record = {"dp": True, "epsilon": 2.9871, "delta": 1e-5, "target_epsilon": 3.0, "noise_multiplier": 0.98,
              "max_grad_norm": 1.0}
    write_metadata(tmp_path / "model", {"kind": "model", "privacy": record, "base_model": "tiny", "device": "cpu",
                                        "training": {"method": "lora"}, "metrics": {"validation": {"macro_f1": 0.9}}})
    run = SimpleNamespace(task_output=lambda task, name: tmp_path / name)
    lines = summary._training_lines(run)
    assert lines[-1] == ("privacy: DP-SGD spent epsilon 2.987 at delta 1e-05 (target 3, noise multiplier 0.980, "
                         "clipping 1)")


def test_the_registry_records_the_spent_epsilon(tmp_path, tiny_dataset):
    from tests.conftest import make_config
    from tuneloop import registry
    from tuneloop.artifacts import write_metadata

    record = {"dp": True, "epsilon": 2.99, "delta": 1e-5}
    write_metadata(tmp_path / "compressed", {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                                             "labels": ["ham", "spam"], "privacy": record})
    (tmp_path / "compressed" / "model.onnx").write_bytes(b"onnx bytes")
    config = make_config(tmp_path)
    decision = {"blessed": True, "checks": [], "test_metrics": {"macro_f1": 0.95, "accuracy": 0.97, "rows": 10}}
    registry.register(config, tmp_path / "compressed", decision, tiny_dataset, pipeline_run="dp-run")
    assert registry.list_versions(config)[0]["privacy"] == record
