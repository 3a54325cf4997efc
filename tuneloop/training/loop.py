"""Fine-tuning for sequence classification with torch + transformers (full or LoRA via peft).

CUDA with bf16 autocast when a GPU is present, CPU otherwise. Seeded, dynamic padding, per-epoch
validation metrics, progress lines with an ETA. Writes the Model contract: a Hugging Face checkpoint
(safetensors, tokenizer, config) plus ``tuneloop.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
    set_seed,
)

from transformers.utils import logging as transformers_logging

from tuneloop.artifacts import write_metadata
from tuneloop.config import TrainingConfig, TuneloopConfig, resolve_base_model
from tuneloop.datasets import load_split
from tuneloop.errors import DataError, ModelError, TrainingError
from tuneloop.metrics import classification_metrics

PROGRESS_UPDATES_PER_EPOCH = 10


@dataclass
class TrainingSummary:
    """What fine-tuning did: sizes, time and the final validation metrics."""

    train_rows: int
    validation_rows: int
    epochs: int
    seconds: float
    device: str
    validation_metrics: dict
    history: list[dict] = field(default_factory=list)

    def to_metrics(self) -> dict[str, float]:
        """Flat numbers for a KFP ``Metrics`` artifact."""
        return {
            "train_rows": float(self.train_rows),
            "training_seconds": round(self.seconds, 1),
            "validation_accuracy": self.validation_metrics["accuracy"],
            "validation_macro_f1": self.validation_metrics["macro_f1"],
            "validation_loss": self.history[-1]["validation_loss"] if self.history else float("nan"),
        }


def run(
    config: TuneloopConfig,
    dataset_path: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    data_fingerprint: str = "",
) -> TrainingSummary:
    """Fine-tune the base model on the train split and write the Model directory.

    Args:
        config: the project config; ``training`` holds the defaults.
        dataset_path: the Dataset artifact (Parquet with a ``split`` column).
        output_dir: where the Model directory is written.
        base_model, epochs, learning_rate: per-run overrides (empty/0/None keep the config value).
        data_fingerprint: the validated data's fingerprint, recorded for lineage.

    Raises:
        ConfigError: the base model does not exist.
        DataError: the dataset lacks a split or holds labels outside ``data.classes``.
        TrainingError: the loss became NaN.
    """
    settings = _with_overrides(config.training, base_model, epochs, learning_rate)
    checkpoint = resolve_base_model(settings.base_model)
    classes = config.data.classes
    train = _limit_rows(load_split(dataset_path, "train"), settings.max_train_rows, settings.seed)
    validation = load_split(dataset_path, "validation")
    text_column, label_column = config.data.text_column, config.data.label_column
    for name, frame in (("train", train), ("validation", validation)):
        _check_labels(frame, label_column, classes, name)

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    set_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = _load_model(checkpoint, classes, settings).to(device)

    train_loader = _loader(tokenizer, train, text_column, label_column, classes, settings, shuffle=True)
    validation_loader = _loader(tokenizer, validation, text_column, label_column, classes, settings, shuffle=False)
    print(
        f"finetune: {settings.method} fine-tuning of {settings.base_model} on {device}: "
        f"{len(train)} train / {len(validation)} validation rows, {settings.epochs} epochs",
        flush=True,
    )
    started = time.monotonic()
    history = _train(model, train_loader, validation_loader, classes, settings, device)
    seconds = time.monotonic() - started

    model = _merge_adapters(model, settings).to("cpu")
    _save(model, tokenizer, output_dir)
    final = history[-1]["validation"]
    metadata = {
        "kind": "model",
        "labels": classes,
        "max_length": settings.max_length,
        "base_model": settings.base_model,
        "data_fingerprint": data_fingerprint,
        "text_column": text_column,
        "label_column": label_column,
        "training": settings.model_dump(mode="json"),
        "metrics": {"validation": final, "history": history, "training_seconds": round(seconds, 1)},
        "device": device,
    }
    write_metadata(output_dir, metadata)
    print(f"finetune: done in {seconds:.0f}s, validation macro-F1 {final['macro_f1']:.4f}", flush=True)
    return TrainingSummary(len(train), len(validation), settings.epochs, seconds, device, final, history)


def _with_overrides(
    settings: TrainingConfig, base_model: str | None, epochs: int | None, learning_rate: float | None
) -> TrainingConfig:
    updated = settings.model_copy()
    if base_model:
        updated.base_model = base_model
    if epochs:
        updated.epochs = epochs
    if learning_rate:
        updated.learning_rate = learning_rate
    return updated


def _limit_rows(frame: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).reset_index(drop=True)


def _check_labels(frame: pd.DataFrame, label_column: str, classes: list[str], split: str) -> None:
    unknown = sorted(set(frame[label_column].astype(str)) - set(classes))
    if unknown:
        raise DataError(
            f"{split} split holds labels outside data.classes {classes}: {unknown[:5]}",
            stage="training",
            field=label_column,
        )


def _load_model(checkpoint: Path, classes: list[str], settings: TrainingConfig) -> torch.nn.Module:
    # A fresh classification head is expected; transformers' load report would only alarm people.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={label: i for i, label in enumerate(classes)},
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load base model {checkpoint}: {error}", stage="training", path=str(checkpoint))
    if settings.method == "lora":
        model = _with_lora(model, settings)
    return model


def _with_lora(model: torch.nn.Module, settings: TrainingConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=settings.lora.target_modules,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise TrainingError(
            f"training.lora.target_modules {settings.lora.target_modules} do not fit this model: {error}",
            stage="training",
            field="training.lora.target_modules",
        ) from error


def _merge_adapters(model: torch.nn.Module, settings: TrainingConfig) -> torch.nn.Module:
    """LoRA adapters are merged into the weights, so every later stage sees a plain checkpoint."""
    return model.merge_and_unload() if settings.method == "lora" else model


def _loader(tokenizer, frame, text_column, label_column, classes, settings, *, shuffle: bool) -> DataLoader:
    label_ids = {label: i for i, label in enumerate(classes)}
    texts = frame[text_column].fillna("").astype(str).tolist()
    encoded = tokenizer(texts, truncation=True, max_length=settings.max_length)
    examples = [
        {"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
         "labels": label_ids[str(frame[label_column].iloc[i])]}
        for i in range(len(texts))
    ]
    if "token_type_ids" in encoded:
        for i, example in enumerate(examples):
            example["token_type_ids"] = encoded["token_type_ids"][i]
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(
        examples,
        batch_size=settings.batch_size,
        shuffle=shuffle,
        collate_fn=DataCollatorWithPadding(tokenizer),
        generator=generator,
    )


def _train(model, train_loader, validation_loader, classes, settings, device) -> list[dict]:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    total_steps = len(train_loader) * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * settings.warmup_ratio), total_steps)
    history, started = [], time.monotonic()
    for epoch in range(1, settings.epochs + 1):
        train_loss = _train_epoch(model, train_loader, optimizer, scheduler, device, epoch, settings.epochs, started)
        validation_loss, metrics = _evaluate(model, validation_loader, classes, device)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss, "validation": metrics}
        )
        print(
            f"finetune: epoch {epoch}/{settings.epochs} train loss {train_loss:.4f} "
            f"validation loss {validation_loss:.4f} accuracy {metrics['accuracy']:.4f} "
            f"macro-F1 {metrics['macro_f1']:.4f}",
            flush=True,
        )
    return history


def _autocast(device: str):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def _train_epoch(model, loader, optimizer, scheduler, device, epoch, epochs, started) -> float:
    model.train()
    losses = []
    report_every = max(1, len(loader) // PROGRESS_UPDATES_PER_EPOCH)
    for step, batch in enumerate(loader, start=1):
        batch = {key: value.to(device) for key, value in batch.items()}
        with _autocast(device):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch} step {step}; lower training.learning_rate",
                stage="training",
                field="training.learning_rate",
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % report_every == 0 or step == len(loader):
            _report_progress(epoch, epochs, step, len(loader), float(np.mean(losses[-report_every:])), started)
    return float(np.mean(losses))


def _report_progress(epoch: int, epochs: int, step: int, steps: int, loss: float, started: float) -> None:
    done = (epoch - 1) * steps + step
    elapsed = time.monotonic() - started
    eta = elapsed / done * (epochs * steps - done)
    print(
        f"finetune: epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4f} "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s",
        flush=True,
    )


@torch.inference_mode()
def _evaluate(model, loader, classes, device) -> tuple[float, dict]:
    model.eval()
    losses, predictions, truths = [], [], []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        with _autocast(device):
            output = model(**batch)
        losses.append(output.loss.item())
        predictions.extend(output.logits.argmax(dim=-1).tolist())
        truths.extend(batch["labels"].tolist())
    metrics = classification_metrics([classes[i] for i in truths], [classes[i] for i in predictions], classes)
    return float(np.mean(losses)), metrics


def _save(model, tokenizer, output_dir: str | Path) -> None:
    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
