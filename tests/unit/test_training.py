"""Fine-tuning on a tiny random BERT: the Model contract and what the loop promises."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tests.conftest import make_config
from tests.unit.training_helpers import tiny_checkpoint_without_dropout, train_config, weights
from tuneloop import training
from tuneloop.errors import ConfigError, DataError
from tuneloop.training.data import global_batches, rank_share
from tuneloop.training.loop import class_weight_vector, resolve_precision


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


# --- the loop: accumulation, early stopping, best epoch, class weights, length grouping, precision ----------



@pytest.fixture(scope="module")
def still_checkpoint(tmp_path_factory):
    return tiny_checkpoint_without_dropout(tmp_path_factory.mktemp("tiny-bert-no-dropout"))


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, still_checkpoint, tiny_dataset):
    common = {"epochs": 1, "group_by_length": False, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    whole = train_config(tmp_path, still_checkpoint, batch_size=16, **common)
    accumulated = train_config(tmp_path, still_checkpoint, batch_size=8, gradient_accumulation=2, **common)
    training.run(whole, tiny_dataset, tmp_path / "whole")
    training.run(accumulated, tiny_dataset, tmp_path / "accumulated")
    first, second = weights(tmp_path / "whole"), weights(tmp_path / "accumulated")
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name
    assert not torch.equal(first["classifier.weight"], weights(still_checkpoint)["classifier.weight"])


def test_early_stopping_keeps_the_best_epoch(tmp_path, tiny_checkpoint, tiny_dataset):
    # A learning rate this small leaves predictions unchanged, so macro-F1 never improves after epoch 1.
    config = train_config(tmp_path, tiny_checkpoint, epochs=4, early_stopping_patience=1, learning_rate=1e-12)
    summary = training.run(config, tiny_dataset, tmp_path / "m")
    assert summary.stopped_early and summary.best_epoch == 1 and summary.epochs_run == 2
    metadata = json.loads((tmp_path / "m" / "tuneloop.json").read_text())
    assert metadata["metrics"]["best_epoch"] == 1 and metadata["metrics"]["run"]["stopped_early"] is True
    assert [h["epoch"] for h in metadata["metrics"]["history"]] == [1, 2]


def test_saved_weights_are_the_best_epochs(tmp_path, tiny_checkpoint, tiny_dataset):
    from transformers import AutoTokenizer
    from tuneloop.datasets import load_split
    from tuneloop.training.data import Collator, encode_split
    from tuneloop.training.loop import evaluate

    config = train_config(tmp_path, tiny_checkpoint, epochs=3, learning_rate=5e-4)
    summary = training.run(config, tiny_dataset, tmp_path / "m")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    split = encode_split(tokenizer, load_split(tiny_dataset, "validation"), "text", "label", ["ham", "spam"], 32)
    loss, metrics = evaluate(model, split, Collator(tokenizer, split), ["ham", "spam"], 16)
    best = summary.history[summary.best_epoch - 1]
    assert loss == pytest.approx(best["validation_loss"], rel=1e-4)
    assert metrics["macro_f1"] == best["validation"]["macro_f1"] == summary.validation_metrics["macro_f1"]
    best_f1 = max(h["validation"]["macro_f1"] for h in summary.history)
    tied = [h for h in summary.history if h["validation"]["macro_f1"] == best_f1]
    assert summary.best_epoch == min(tied, key=lambda h: h["validation_loss"])["epoch"]


def test_patience_not_below_epochs_is_refused(tmp_path, tiny_checkpoint, tiny_dataset):
    config = train_config(tmp_path, tiny_checkpoint, epochs=3, early_stopping_patience=2)
    with pytest.raises(ConfigError, match="early_stopping_patience 2 must be below epochs 2"):
        training.run(config, tiny_dataset, tmp_path / "m", epochs=2)
    with pytest.raises(ConfigError, match="training.*early_stopping_patience 3 must be below epochs 3"):
        train_config(tmp_path, tiny_checkpoint, epochs=3, early_stopping_patience=3)


def test_balanced_class_weights_and_per_class_metrics(tmp_path, tiny_checkpoint, tiny_dataset):
    vector = class_weight_vector("balanced", np.array([0, 0, 0, 1]), 2)
    assert vector.tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weight_vector("none", np.array([0, 1]), 2).tolist() == [1.0, 1.0]
    plain = training.run(train_config(tmp_path, tiny_checkpoint, learning_rate=1e-3), tiny_dataset, tmp_path / "a")
    balanced = training.run(train_config(tmp_path, tiny_checkpoint, learning_rate=1e-3, class_weights="balanced"),
                            tiny_dataset, tmp_path / "b")
    assert plain.history[0]["train_loss"] != balanced.history[0]["train_loss"]
    metrics = balanced.to_metrics()
    assert {"validation_f1_ham", "validation_f1_spam"} <= set(metrics)
    per_class = balanced.validation_metrics["per_class"]
    assert metrics["validation_f1_spam"] == per_class["spam"]["f1"]
    assert per_class["ham"]["support"] + per_class["spam"]["support"] == balanced.validation_rows


def test_length_grouped_batches_cover_every_row_once_and_pad_less():
    lengths = np.random.default_rng(0).integers(5, 120, size=997)
    grouped = global_batches(lengths, 16, seed=1, epoch=1, group_by_length=True)
    shuffled = global_batches(lengths, 16, seed=1, epoch=1, group_by_length=False)
    assert sorted(i for batch in grouped for i in batch) == list(range(997))
    padded = lambda batches: sum(max(lengths[b]) * len(b) for b in batches)  # noqa: E731
    assert padded(grouped) < 0.8 * padded(shuffled)
    assert grouped == global_batches(lengths, 16, seed=1, epoch=1, group_by_length=True)
    assert grouped != global_batches(lengths, 16, seed=1, epoch=2, group_by_length=True)
    shares = [rank_share(batch, rank, 3) for batch in grouped for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(997))


def test_precision_choice(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cuda") == "fp16"
