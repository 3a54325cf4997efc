"""Differentially private fine-tuning: DP-SGD with Opacus (``training.privacy.dp: true``).

Each step samples a batch by Poisson sampling (every training row joins with probability
``batch_size / rows``), clips every row's gradient to ``max_grad_norm``, adds Gaussian noise sized by
Opacus so that the whole run spends at most ``target_epsilon`` at ``delta`` (unset: ``1 / (10 x rows)``),
and steps AdamW. Full fine-tuning and LoRA both work: only the trainable parameters get per-example
gradients. The model kept is the last epoch's (validation metrics are reported per epoch, but choosing
an epoch by them would be a decision outside the privacy accounting). The spent epsilon comes from
Opacus's accountant and is written to the model's ``tuneloop.json``, the training metrics and the
registry tags; ``privacy.max_epsilon`` makes the gate require it.

Settings DP-SGD cannot honour here are refused before training, each named (:func:`check_settings`):
several processes, gradient accumulation, fp16/bf16, a ``delta`` not below ``1 / rows``, a batch as
large as the training set, and a budget too small for the epochs and sampling rate (Opacus's own
verdict). A DP run writes no checkpoints: a retried run starts over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tuneloop.config import TrainingConfig
from tuneloop.errors import TrainingError

STAGE = "training"
ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class PrivacySpent:
    """What a DP-SGD run spent: epsilon at delta, with the noise and clipping that bought it."""

    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accountant: str = ACCOUNTANT

    def record(self) -> dict:
        """The JSON record written to ``tuneloop.json`` (``privacy``) and the registry tag."""
        return {"dp": True, "epsilon": round(self.epsilon, 4), "delta": self.delta,
                "target_epsilon": self.target_epsilon, "noise_multiplier": round(self.noise_multiplier, 4),
                "max_grad_norm": self.max_grad_norm, "sample_rate": round(self.sample_rate, 6), "steps": self.steps,
                "accountant": self.accountant, "mechanism": "DP-SGD (Opacus)"}


def resolved_delta(settings: TrainingConfig, train_rows: int) -> float:
    """``training.privacy.delta``, else ``1 / (10 x training rows)``."""
    return settings.privacy.delta if settings.privacy.delta is not None else 1.0 / (10 * max(train_rows, 1))


def check_settings(settings: TrainingConfig, train_rows: int) -> None:
    """Refuse settings DP-SGD cannot honour, naming the field.

    Raises:
        TrainingError: one line naming the setting and why.
    """
    problems = []
    if settings.processes > 1:
        problems.append(("training.processes", f"training.privacy.dp runs in one process (Opacus's per-example "
                                               f"clipping and accounting here are single-process); got "
                                               f"processes={settings.processes}"))
    if settings.gradient_accumulation > 1:
        problems.append(("training.gradient_accumulation", "training.privacy.dp samples each batch by Poisson "
                                                           "sampling; gradient_accumulation must be 1 (raise "
                                                           "batch_size instead)"))
    if settings.precision in ("fp16", "bf16"):
        problems.append(("training.precision", f"training.privacy.dp clips per-example gradients in fp32; "
                                               f"precision {settings.precision} is not supported"))
    if train_rows < 2 or settings.batch_size >= train_rows:
        problems.append(("training.batch_size", f"training.privacy.dp needs batch_size ({settings.batch_size}) "
                                                f"below the training rows ({train_rows}) for sampling to hide "
                                                f"anyone"))
    delta = resolved_delta(settings, train_rows)
    if delta >= 1.0 / max(train_rows, 1):
        problems.append(("training.privacy.delta", f"training.privacy.delta {delta:g} must be below 1 / training "
                                                   f"rows ({1.0 / train_rows:.3g}); otherwise the guarantee allows "
                                                   f"leaking a row outright"))
    if problems:
        field, message = problems[0]
        raise TrainingError(message, stage=STAGE, field=field)


def noise_multiplier(settings: TrainingConfig, train_rows: int) -> float:
    """The noise Opacus needs for ``target_epsilon`` over the run.

    Raises:
        TrainingError: the budget is too small for the epochs and sampling rate (Opacus cannot reach it).
    """
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate = settings.batch_size / train_rows
    try:
        return float(get_noise_multiplier(target_epsilon=settings.privacy.target_epsilon,
                                          target_delta=resolved_delta(settings, train_rows), sample_rate=sample_rate,
                                          epochs=settings.epochs, accountant=ACCOUNTANT))
    except ValueError as error:
        raise TrainingError(
            f"training.privacy.target_epsilon {settings.privacy.target_epsilon:g} cannot be met with "
            f"{settings.epochs} epochs at sample rate {sample_rate:.4f} (Opacus: {error}); raise target_epsilon or "
            f"lower epochs", stage=STAGE, field="training.privacy.target_epsilon") from error


class _RowIndices(torch.utils.data.Dataset):
    """Row numbers of the training split; the collate function turns a batch of them into tensors."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int):
        return (torch.tensor(index),)


def train_private(model, tokenizer, train, validation, classes: list[str], settings: TrainingConfig, *,
                  log: Callable[[str], None] = print):
    """Train ``model`` in place with DP-SGD and return ``(LoopResult, PrivacySpent)``.

    Raises:
        TrainingError: settings DP-SGD cannot honour (named), a model Opacus cannot wrap (the module
            named), or a loss that stops being finite.
    """
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    from tuneloop.training.data import Collator
    from tuneloop.training.loop import (
        LoopResult,
        LoopState,
        class_weight_vector,
        evaluate,
    )

    rows = len(train)
    check_settings(settings, rows)
    model.train()
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise TrainingError(f"training.privacy.dp: Opacus cannot compute per-example gradients of this model: "
                            f"{problems[0]}", stage=STAGE, field="training.base_model")
    sigma = noise_multiplier(settings, rows)
    delta = resolved_delta(settings, rows)
    weights = class_weight_vector(settings.class_weights, train.labels, len(classes))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    loader = torch.utils.data.DataLoader(_RowIndices(rows), batch_size=settings.batch_size,
                                         generator=torch.Generator().manual_seed(settings.seed))
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    private_model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=settings.privacy.max_grad_norm, poisson_sampling=True)
    collate, evaluate_collate = Collator(tokenizer, train), Collator(tokenizer, validation)
    log(f"finetune: DP-SGD (Opacus) target epsilon {settings.privacy.target_epsilon:g} at delta {delta:.3g}: noise "
        f"multiplier {sigma:.3f}, clipping {settings.privacy.max_grad_norm:g}, sample rate {settings.batch_size / rows:.4f}")
    state, steps = LoopState(), 0
    try:
        for epoch in range(1, settings.epochs + 1):
            state.epoch, loss_sum, loss_rows = epoch, 0.0, 0
            for (indices,) in loader:
                if len(indices) == 0:  # Poisson sampling can draw an empty batch; the accountant counts it anyway
                    optimizer.zero_grad(set_to_none=True)
                    continue
                features, labels = collate(indices.tolist())
                logits = private_model(**_per_row_positions(model, features)).logits
                per_row = F.cross_entropy(logits.float(), labels, reduction="none")
                loss = (per_row * weights[labels]).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at epoch {epoch}; lower training.learning_rate",
                                        stage=STAGE, field="training.learning_rate")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(per_row.sum().item())
                loss_rows += len(indices)
                steps += 1
            validation_loss, metrics = evaluate(model, validation, evaluate_collate, classes, settings.batch_size)
            spent = engine.get_epsilon(delta)
            state.history.append({"epoch": epoch, "train_loss": loss_sum / max(loss_rows, 1),
                                  "validation_loss": validation_loss, "validation": metrics, "epsilon": spent})
            log(f"finetune: epoch {epoch}/{settings.epochs} (DP-SGD) train loss {loss_sum / max(loss_rows, 1):.4f} "
                f"validation macro-F1 {metrics['macro_f1']:.4f} epsilon spent {spent:.3f}")
    finally:
        private_model._close()  # remove Opacus's hooks: the model object is the caller's again
    state.best_epoch = settings.epochs
    state.best_macro_f1 = state.history[-1]["validation"]["macro_f1"]
    state.epoch, state.global_step = settings.epochs + 1, steps
    best = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    spent = PrivacySpent(epsilon=float(engine.get_epsilon(delta)), delta=delta,
                         target_epsilon=settings.privacy.target_epsilon, noise_multiplier=sigma,
                         max_grad_norm=settings.privacy.max_grad_norm, sample_rate=settings.batch_size / rows,
                         steps=steps)
    if not math.isfinite(spent.epsilon):
        raise TrainingError("the privacy accountant returned a non-finite epsilon", stage=STAGE)
    return LoopResult(state, best, "fp32", 1, None), spent


def _per_row_positions(model, features: dict) -> dict:
    """``features`` with explicit per-row ``position_ids`` where the model takes them: BERT-like models
    otherwise broadcast one shared row of positions, and Opacus sees a batch of 1 in the position
    embedding instead of one gradient per example."""
    import inspect

    if "position_ids" in features or "position_ids" not in inspect.signature(model.forward).parameters:
        return features
    batch, length = features["input_ids"].shape
    return {**features, "position_ids": torch.arange(length).unsqueeze(0).expand(batch, length).contiguous()}


def epsilon_check(model_metadata: dict, max_epsilon: float | None) -> dict | None:
    """The gate's privacy check: passes only for a DP-SGD model whose spent epsilon is at most
    ``max_epsilon``; a model without a privacy record fails (closed). None when no maximum is set."""
    if max_epsilon is None:
        return None
    record = model_metadata.get("privacy") or {}
    spent = record.get("epsilon") if record.get("dp") else None
    passed = spent is not None and np.isfinite(spent) and spent <= max_epsilon
    return {"name": "dp_epsilon", "value": spent, "threshold": max_epsilon, "passed": bool(passed)}


def with_privacy(metadata: dict, dataset_path, spent: PrivacySpent | None) -> dict:
    """A model's ``tuneloop.json`` with its privacy record: ``privacy`` (DP-SGD's spent epsilon, or
    ``{"dp": false}``), ``metrics.epsilon``, and how its training texts were treated
    (:data:`tuneloop.privacy.TEXT_PRIVACY_KEY`, read from the training frame) so serving masks alike."""
    from tuneloop.privacy import TEXT_PRIVACY_KEY

    record = spent.record() if spent is not None else {"dp": False}
    metadata = {**metadata, "privacy": record}
    if spent is not None:
        metadata["metrics"] = {**metadata.get("metrics", {}), "epsilon": record["epsilon"], "delta": record["delta"]}
    text_privacy = dataset_text_privacy(dataset_path)
    if text_privacy is not None:
        metadata[TEXT_PRIVACY_KEY] = text_privacy
    return metadata


def dataset_text_privacy(dataset_path) -> dict | None:
    """The :data:`tuneloop.privacy.TEXT_PRIVACY_KEY` record of a Dataset artifact (pandas keeps a frame's
    ``attrs`` in the Parquet footer), or None for a frame written before it existed."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq

    from tuneloop.privacy import TEXT_PRIVACY_KEY

    path = Path(dataset_path)
    path = path / "dataset.parquet" if path.is_dir() else path
    try:
        footer = pq.read_schema(path).metadata or {}
        attrs = json.loads(footer.get(b"PANDAS_ATTRS", b"{}"))
    except (OSError, ValueError):
        return None
    return attrs.get(TEXT_PRIVACY_KEY)
