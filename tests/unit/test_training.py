"""Fine-tuning on a tiny random BERT writes the Model contract."""

import json

import pytest
from transformers import AutoModelForSequenceClassification

from tests.conftest import make_config
from tuneloop import training
from tuneloop.errors import ConfigError, DataError


def train_config(tmp_path, checkpoint, **training_overrides):
    settings = {"base_model": str(checkpoint), "epochs": 1, "batch_size": 16, "max_length": 32, **training_overrides}
    return make_config(tmp_path, training=settings)


def test_full_finetune_writes_model_contract(tmp_path, tiny_checkpoint, tiny_dataset):
    output = tmp_path / "model"
    summary = training.run(train_config(tmp_path, tiny_checkpoint), tiny_dataset, output, data_fingerprint="abc")
    assert (output / "model.safetensors").is_file()
    assert (output / "tokenizer.json").is_file()
    assert not list(output.glob("*.bin")), "no pickle-based weights"
    metadata = json.loads((output / "tuneloop.json").read_text())
    assert metadata["labels"] == ["ham", "spam"]
    assert metadata["max_length"] == 32 and metadata["data_fingerprint"] == "abc"
    assert len(metadata["metrics"]["history"]) == 1
    assert 0.0 <= summary.validation_metrics["macro_f1"] <= 1.0
    reloaded = AutoModelForSequenceClassification.from_pretrained(output)
    assert reloaded.config.id2label == {0: "ham", 1: "spam"}


def test_training_is_seeded(tmp_path, tiny_checkpoint, tiny_dataset):
    first = training.run(train_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "a")
    second = training.run(train_config(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "b")
    assert first.history[0]["train_loss"] == pytest.approx(second.history[0]["train_loss"], rel=1e-5)


def test_lora_merges_into_a_plain_checkpoint(tmp_path, tiny_checkpoint, tiny_dataset):
    config = train_config(tmp_path, tiny_checkpoint, method="lora", learning_rate=1e-3)
    training.run(config, tiny_dataset, tmp_path / "lora")
    weights = (tmp_path / "lora" / "model.safetensors").read_bytes()
    assert b"lora_" not in weights[:20000], "adapters are merged before saving"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora")


def test_overrides_and_bad_inputs(tmp_path, tiny_checkpoint, tiny_dataset):
    config = train_config(tmp_path, tiny_checkpoint)
    with pytest.raises(ConfigError, match="training.base_model"):
        training.run(config, tiny_dataset, tmp_path / "m", base_model=str(tmp_path / "missing"))
    bad = make_config(tmp_path, data={"texts": "t", "labels": "l", "classes": ["ham", "eggs"]},
                      training={"base_model": str(tiny_checkpoint)})
    with pytest.raises(DataError, match="labels outside data.classes"):
        training.run(bad, tiny_dataset, tmp_path / "m")
