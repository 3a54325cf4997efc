"""Distillation: a student with fewer layers, initialised from the teacher's own layers, trained on the
teacher's soft targets.

The student is a copy of the fine-tuned teacher that keeps ``compression.distillation.student_layers``
of its encoder layers, evenly spaced from the first to the last (3 of 6: layers 0, 2 and 5), with the
teacher's embeddings and classification head. It is trained on the train split, and optionally on
extra unlabelled texts from ``data.texts`` (rows without a label whose entity key hashes to the
train split, so no validation or test text leaks in), with

    loss = soft_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - soft_weight) * cross_entropy(student, label)

where the hard term counts only labelled rows. The teacher's logits are computed once, before
training. Training runs on the GPU where the step has one, else on CPU; the student comes back on
CPU in eval mode. Pruning's recovery fine-tune uses the same loop (:func:`train_on_soft_targets`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tuneloop.compression.common import STAGE, log
from tuneloop.errors import CompressionError, DataError

SUPPORTED_HINT = "BERT-style encoders (bert, roberta, xlm-roberta, electra: <base>.encoder.layer with self-attention)"
UNLABELLED = -1
"""Label index of a row without a label: only the soft term of the loss applies to it."""
TEACHER_BATCH = 64


@dataclass
class SoftTargetTraining:
    """How a student learns from the teacher (a view of ``DistillationConfig`` or ``PruningConfig``)."""

    epochs: int
    learning_rate: float
    batch_size: int
    temperature: float
    soft_weight: float
    seed: int = 0
    warmup_share: float = 0.1


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's layer list of a supported sequence classifier.

    Raises:
        CompressionError: the architecture is not a supported BERT-style encoder (names its type).
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    supported = isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and all(
        hasattr(layer, "attention") and hasattr(getattr(layer.attention, "self", None), "query")
        and hasattr(layer, "intermediate") and hasattr(layer, "output") for layer in layers
    )
    if not supported:
        kind = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
        raise CompressionError(
            f"teacher architecture {kind!r} ({type(model).__name__}) is not supported for distillation or pruning; "
            f"supported: {SUPPORTED_HINT}. Leave the distilled_*/pruned_* variants out of compression.variants",
            stage=STAGE, field="compression.variants",
        )
    return layers


def keep_layers(model: torch.nn.Module, indices: Sequence[int]) -> torch.nn.Module:
    """Keep only the encoder layers at ``indices`` (in order), in place; the config follows."""
    layers = encoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in indices])
    for position, layer in enumerate(kept):  # layer_idx addresses a cache; keep it consistent
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = position
    base = getattr(model, model.base_model_prefix)
    base.encoder.layer = kept
    model.config.num_hidden_layers = len(kept)
    return model


def student_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers from the first to the last (3 of 6: [0, 2, 5]).

    Raises:
        CompressionError: the student would not be smaller than the teacher, or has no layer.
    """
    if not 1 <= student_layers < teacher_layers:
        raise CompressionError(
            f"compression.distillation.student_layers is {student_layers} but the teacher has {teacher_layers} "
            f"layers: a student needs at least 1 and fewer than the teacher's {teacher_layers}",
            stage=STAGE, field="compression.distillation.student_layers",
        )
    return [int(i) for i in np.linspace(0, teacher_layers - 1, student_layers).round().astype(int)]


def check_distillable(model: torch.nn.Module, train_rows: int, settings: Any) -> list[int]:
    """Refuse, before any work, what distillation cannot do; return the teacher layers the student keeps.

    Raises:
        DataError: fewer train rows than ``min_train_rows``.
        CompressionError: unsupported architecture (named), or a student not smaller than the teacher.
    """
    if train_rows < settings.min_train_rows:
        raise DataError(
            f"distillation needs at least compression.distillation.min_train_rows={settings.min_train_rows} "
            f"train rows to learn from; the dataset's train split holds {train_rows}",
            stage=STAGE, field="compression.distillation.min_train_rows",
        )
    return student_layer_indices(len(encoder_layers(model)), settings.student_layers)


def teacher_logits(teacher: Any, texts: Sequence[str]) -> np.ndarray:
    """The teacher's logits for every text, in order (``teacher`` is a ``TorchClassifier``), computed
    on the GPU where there is one; the teacher goes back to CPU afterwards."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = teacher.model.to(device)
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), TEACHER_BATCH):
                encoded = teacher.tokenizer(list(texts[start : start + TEACHER_BATCH]), truncation=True,
                                            max_length=teacher.max_length, padding=True, return_tensors="pt")
                out.append(model(**encoded.to(device)).logits.float().cpu().numpy())
    finally:
        teacher.model.to("cpu")
    return np.concatenate(out, axis=0) if out else np.zeros((0, len(teacher.labels)), dtype=np.float32)


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                     temperature: float, soft_weight: float) -> torch.Tensor:
    """``soft_weight`` x the temperature-scaled KL to the teacher + the rest x cross-entropy on the
    labelled rows (label ``UNLABELLED`` rows add no hard term)."""
    soft = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1),
                    reduction="batchmean") * temperature**2
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student[labelled], labels[labelled]) if bool(labelled.any()) else student.sum() * 0.0
    return soft_weight * soft + (1.0 - soft_weight) * hard


def train_on_soft_targets(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                          targets: np.ndarray, settings: SoftTargetTraining, *, max_length: int,
                          what: str) -> dict[str, Any]:
    """Train ``model`` in place on (text, label index or ``UNLABELLED``, teacher logits) rows.

    AdamW with linear warm-up and decay, shuffled each epoch (seeded), dynamic padding per batch.

    Returns:
        the record: device, rows, steps, seconds and the mean loss of each epoch.
    """
    from transformers import get_linear_schedule_with_warmup

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(texts) / settings.batch_size)
    total = max(1, steps_per_epoch * settings.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_share * total), total)
    label_tensor = torch.tensor(list(labels), dtype=torch.long)
    target_tensor = torch.tensor(np.asarray(targets), dtype=torch.float32)
    started, losses, done = time.perf_counter(), [], 0
    report_every = max(1, total // 10)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        running = 0.0
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            encoded = tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt").to(device)
            logits = model(**encoded).logits
            loss = soft_target_loss(logits, target_tensor[rows].to(device), label_tensor[rows].to(device),
                                    temperature=settings.temperature, soft_weight=settings.soft_weight)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += float(loss.detach()) * len(rows)
            done += 1
            if done % report_every == 0 and done < total:
                elapsed = time.perf_counter() - started
                log(f"{what}: step {done}/{total}, loss {float(loss.detach()):.4f}, elapsed {elapsed:.0f}s, "
                    f"eta {elapsed / done * (total - done):.0f}s")
        losses.append(round(running / max(len(texts), 1), 5))
        log(f"{what}: epoch {epoch + 1}/{settings.epochs}, soft-target loss {losses[-1]:.4f} "
            f"({time.perf_counter() - started:.0f}s)")
    model.to("cpu").eval()
    return {"device": device, "rows": len(texts), "steps": steps_per_epoch * settings.epochs,
            "seconds": round(time.perf_counter() - started, 1), "epoch_losses": losses}


def distil(teacher: Any, texts: Sequence[str], labels: Sequence[str], settings: Any, *,
           unlabelled_texts: Sequence[str] = ()) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a smaller student from the fine-tuned ``teacher`` (a ``TorchClassifier``).

    Args:
        texts, labels: the train split (label names).
        settings: ``compression.distillation`` (``DistillationConfig``).
        unlabelled_texts: extra train-split texts without labels (soft targets only).

    Returns:
        ``(student on CPU in eval mode, the recipe record)``.

    Raises:
        DataError: fewer train rows than ``min_train_rows``.
        CompressionError: unsupported architecture, or a student not smaller than the teacher.
    """
    indices = check_distillable(teacher.model, len(texts), settings)
    teacher_count = len(encoder_layers(teacher.model))
    student = keep_layers(copy.deepcopy(teacher.model), indices)
    index_of = {label: i for i, label in enumerate(teacher.labels)}
    rows = list(texts) + list(unlabelled_texts)
    label_ids = [index_of[label] for label in labels] + [UNLABELLED] * len(unlabelled_texts)
    log(f"distilling a {len(indices)}-layer student from the teacher's layers {indices} of {teacher_count}: "
        f"{len(texts)} labelled + {len(unlabelled_texts)} unlabelled rows, {settings.epochs} epochs, "
        f"temperature {settings.temperature:g}, soft weight {settings.soft_weight:g}")
    started = time.perf_counter()
    targets = teacher_logits(teacher, rows)
    training = train_on_soft_targets(
        student, teacher.tokenizer, rows, label_ids, targets,
        SoftTargetTraining(settings.epochs, settings.learning_rate, settings.batch_size, settings.temperature,
                           settings.soft_weight, settings.seed),
        max_length=teacher.max_length, what="distil")
    recipe = {"method": "distillation", "teacher_layers": teacher_count, "student_layers": len(indices),
              "initialised_from_teacher_layers": indices, "temperature": settings.temperature,
              "soft_weight": settings.soft_weight, "labelled_rows": len(texts),
              "unlabelled_rows": len(unlabelled_texts), "epochs": settings.epochs,
              "learning_rate": settings.learning_rate, "parameters": _parameters(student),
              "teacher_parameters": _parameters(teacher.model), "training": training,
              "seconds": round(time.perf_counter() - started, 1)}
    return student, recipe


def _parameters(model: torch.nn.Module) -> int:
    return int(sum(parameter.numel() for parameter in model.parameters()))


def unlabelled_train_texts(config: Any, limit: int) -> list[str]:
    """Texts from ``data.texts`` that have no label in ``data.labels`` and whose entity key hashes to the
    train split (``features.split``), at most ``limit`` (the first by key, for a repeatable run)."""
    import pandas as pd

    from tuneloop.config import is_uri
    from tuneloop.datasets import assign_split, read_table

    def table(location: str, what: str) -> pd.DataFrame:
        return pd.read_parquet(location) if is_uri(location) else read_table(location, what=what)

    data, split = config.data, config.features.split
    texts = table(data.texts, "texts file").reset_index(drop=True)
    labelled = set(table(data.labels, "labels file")[data.id_column].astype(str))
    keys = texts[data.id_column].astype(str)
    unlabelled = texts[~keys.isin(labelled)].assign(_key=keys).sort_values("_key")
    in_train = [assign_split(key, validation=split.validation, test=split.test, salt=split.salt) == "train"
                for key in unlabelled["_key"]]
    chosen = unlabelled[in_train][data.text_column].fillna("").astype(str)
    return [text for text in chosen.tolist() if text.strip()][:limit]
