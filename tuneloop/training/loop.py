"""The fine-tuning loop, on ``accelerate``: one process, or one rank of a ``torchrun`` DDP job.

What it does per optimizer step: ``gradient_accumulation`` micro-batches of ``batch_size`` rows (the
global batch; each of N processes takes 1/N of it), a loss normalised by the whole step's (class-)
weight so that 1 process, N processes and any accumulation give the same gradient, mixed precision
from :func:`resolve_precision` (fp16 through accelerate's grad scaler), gradient clipping, a linear
schedule with warm-up. Per epoch: validation metrics, the best epoch's weights kept, early stopping.
Checkpoints go to :mod:`tuneloop.training.checkpoints` every N steps, at epoch ends and on SIGTERM;
a run with a checkpoint of its own resumes from it and ends with the weights it would have had.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from tuneloop.config import TrainingConfig
from tuneloop.errors import TrainingError
from tuneloop.metrics import classification_metrics
from tuneloop.training.checkpoints import CheckpointStore, optimizer_payload, restore_optimizer
from tuneloop.training.data import Collator, EncodedSplit, evaluation_batches, global_batches, rank_share

PROGRESS_UPDATES_PER_EPOCH = 10
LOSS_MIN_DELTA = 1e-4
"""At equal validation macro-F1, an epoch is better only if its validation loss is lower by this much."""
IDENTITY_FIELDS = ("base_model", "method", "lora", "epochs", "batch_size", "learning_rate", "weight_decay",
                   "warmup_ratio", "max_length", "seed", "max_train_rows", "gradient_accumulation",
                   "class_weights", "group_by_length", "early_stopping_patience")
"""Settings that change the trajectory: a checkpoint written under other values is refused."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (JSON)."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    loss_rows: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_macro_f1: float = -1.0
    best_validation_loss: float = 1e300  # breaks macro-F1 ties (a model that still predicts one class)
    stale_epochs: int = 0
    stopped_early: bool = False
    resumed_from_step: int = 0
    train_seconds: float = 0.0  # optimizer steps only: no validation, no checkpoints


@dataclass
class LoopResult:
    """What the loop hands back: the state, the best weights and the precision it ran in."""

    state: LoopState
    best_weights: dict[str, torch.Tensor]
    precision: str
    world_size: int
    checkpoint: str | None


def resolve_precision(requested: str, device: str) -> str:
    """The precision to train in: fp32 on CPU; on CUDA bf16 where supported, else fp16 (grad scaler)."""
    if device != "cuda":
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def identity(settings: TrainingConfig, classes: list[str], train_rows: int, data_fingerprint: str) -> dict:
    """What a checkpoint must match to be resumed: model, labels, data and trajectory settings."""
    dumped = settings.model_dump(mode="json")
    return {**{key: dumped[key] for key in IDENTITY_FIELDS}, "classes": classes, "train_rows": train_rows,
            "data_fingerprint": data_fingerprint}


def class_weight_vector(mode: str, labels: np.ndarray, classes: int) -> torch.Tensor:
    """Per-class loss weights: ones, or ``rows / (classes * rows_of_class)`` for ``balanced``."""
    if mode == "none":
        return torch.ones(classes)
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def train_model(model, tokenizer, train: EncodedSplit, validation: EncodedSplit, classes: list[str],
                settings: TrainingConfig, *, store: CheckpointStore | None, run_identity: dict,
                on_step: Callable[[int], None] | None = None, on_epoch: Callable[[dict], None] | None = None,
                log=print) -> LoopResult:
    """Train ``model`` (in place) and return the loop state and the best epoch's weights."""
    from accelerate import Accelerator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(settings.precision, device)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    if settings.precision not in ("auto", precision) and accelerator.is_main_process:
        log(f"finetune: training.precision {settings.precision} needs a CUDA GPU; training in {precision}")
    weights = class_weight_vector(settings.class_weights, train.labels, len(classes))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train) / settings.batch_size) / settings.gradient_accumulation)
    total_steps = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * settings.warmup_ratio), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state, best = LoopState(), {}
    if store is not None:
        best = _resume(store, run_identity, accelerator, model, optimizer, scheduler, state, log)
    collate, evaluate_collate = Collator(tokenizer, train), Collator(tokenizer, validation)
    stop = _SigtermFlag()
    started, steps_at_start = time.monotonic(), state.global_step
    checkpoint_uri = None
    with stop:
        while state.epoch <= settings.epochs and not state.stopped_early:
            batches = global_batches(train.lengths, settings.batch_size, seed=settings.seed, epoch=state.epoch,
                                     group_by_length=settings.group_by_length)
            groups = [batches[i:i + settings.gradient_accumulation]
                      for i in range(0, len(batches), settings.gradient_accumulation)]
            report_every = max(1, len(groups) // PROGRESS_UPDATES_PER_EPOCH)
            model.train()
            while state.step_in_epoch < len(groups):
                group = groups[state.step_in_epoch]
                step_started = time.monotonic()
                loss_sum, rows = _optimizer_step(accelerator, model, optimizer, scheduler, group, collate, weights,
                                                 rank, world, state)
                totals = _reduce(accelerator, [loss_sum, rows, float(stop.requested)])
                state.train_seconds += time.monotonic() - step_started
                state.loss_sum += totals[0]
                state.loss_rows += int(totals[1])
                state.step_in_epoch += 1
                state.global_step += 1
                if accelerator.is_main_process and (state.step_in_epoch % report_every == 0
                                                    or state.step_in_epoch == len(groups)):
                    _report_progress(state, settings.epochs, len(groups), total_steps, steps_at_start, started, log)
                saved = False
                if settings.checkpoint_every_steps and state.global_step % settings.checkpoint_every_steps == 0:
                    checkpoint_uri = _checkpoint(store, accelerator, model, optimizer, scheduler, state, best,
                                                 run_identity)
                    saved = True
                if on_step is not None:
                    on_step(state.global_step)
                if totals[2] > 0 or stop.requested:
                    if not saved:
                        checkpoint_uri = _checkpoint(store, accelerator, model, optimizer, scheduler, state, best,
                                                     run_identity)
                    # A plain TrainingError: the pipeline runner prints tuneloop.errors lines as the failure.
                    raise TrainingError(
                        f"training stopped by SIGTERM at step {state.global_step}; "
                        + (f"checkpoint {checkpoint_uri} written, a retry resumes from it" if checkpoint_uri
                           else "no checkpoint store (no pipeline run name), a retry starts over"),
                        stage="training",
                    )
            best = _end_epoch(accelerator, model, validation, evaluate_collate, classes, settings, state, best, log)
            checkpoint_uri = _checkpoint(store, accelerator, model, optimizer, scheduler, state, best, run_identity)
            if on_epoch is not None:
                on_epoch(state.history[-1])
    return LoopResult(state, best, precision, world, checkpoint_uri)


def _optimizer_step(accelerator, model, optimizer, scheduler, group, collate, weights, rank, world,
                    state) -> tuple[float, int]:
    """One optimizer step over a group of global batches; returns this rank's loss sum and rows."""
    group_weight = float(sum(weights[collate._split.labels[index]] for batch in group for index in batch))
    loss_total, rows = 0.0, 0
    for position, batch in enumerate(group):
        share = rank_share(batch, rank, world)
        # A rank without rows still runs forward/backward (weight 0) so DDP's all-reduce lines up.
        indices, scale = (share, 1.0) if share else (batch[:1], 0.0)
        features, labels = collate(indices)
        features = {key: value.to(accelerator.device) for key, value in features.items()}
        labels = labels.to(accelerator.device)
        last = position == len(group) - 1
        context = accelerator.no_sync(model) if not last else nullcontext()
        with context:
            with accelerator.autocast():
                logits = model(**features).logits
            per_row = F.cross_entropy(logits.float(), labels, reduction="none")
            weighted = (per_row * weights.to(per_row.device)[labels]).sum() * scale
            # DDP averages gradients over ranks: multiplying by the world size turns that into a sum.
            loss = weighted * world / group_weight
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {state.epoch} step {state.global_step + 1}; "
                    "lower training.learning_rate", stage="training", field="training.learning_rate",
                )
            accelerator.backward(loss)
        loss_total += float(per_row.sum().item()) * scale
        rows += len(share)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, rows


def _end_epoch(accelerator, model, validation, collate, classes, settings, state, best, log) -> dict:
    """Validate, record history, keep the best weights, decide on early stopping."""
    validation_loss, metrics = evaluate(accelerator.unwrap_model(model), validation, collate, classes,
                                        settings.batch_size, accelerator)
    train_loss = state.loss_sum / max(state.loss_rows, 1)
    state.history.append({"epoch": state.epoch, "train_loss": train_loss, "validation_loss": validation_loss,
                          "validation": metrics})
    improved = metrics["macro_f1"] > state.best_macro_f1 or (
        metrics["macro_f1"] == state.best_macro_f1 and validation_loss < state.best_validation_loss - LOSS_MIN_DELTA)
    if improved:
        state.best_epoch, state.best_macro_f1, state.stale_epochs = state.epoch, metrics["macro_f1"], 0
        state.best_validation_loss = validation_loss
        weights = accelerator.unwrap_model(model).state_dict()
        best = {key: value.detach().cpu().clone() for key, value in weights.items()}
    else:
        state.stale_epochs += 1
    if accelerator.is_main_process:
        log(f"finetune: epoch {state.epoch}/{settings.epochs} train loss {train_loss:.4f} "
            f"validation loss {validation_loss:.4f} accuracy {metrics['accuracy']:.4f} "
            f"macro-F1 {metrics['macro_f1']:.4f}" + (" (best so far)" if improved else ""))
    patience = settings.early_stopping_patience
    if patience is not None and state.stale_epochs >= patience and state.epoch < settings.epochs:
        state.stopped_early = True
        if accelerator.is_main_process:
            log(f"finetune: early stopping after epoch {state.epoch}: no better validation macro-F1 for "
                f"{patience} epochs; keeping epoch {state.best_epoch} ({state.best_macro_f1:.4f})")
    state.epoch += 1
    state.step_in_epoch, state.loss_sum, state.loss_rows = 0, 0.0, 0
    return best


@torch.inference_mode()
def evaluate(model, split: EncodedSplit, collate: Collator, classes: list[str], batch_size: int,
             accelerator=None) -> tuple[float, dict]:
    """Validation loss (unweighted) and classification metrics of ``model`` on a split."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, predictions = 0.0, np.empty(len(split), dtype=np.int64)
    for batch in evaluation_batches(len(split), batch_size, split.lengths):
        features, labels = collate(batch)
        features = {key: value.to(device) for key, value in features.items()}
        autocast = accelerator.autocast() if accelerator is not None else nullcontext()
        with autocast:
            logits = model(**features).logits.float()
        loss_sum += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        predictions[batch] = logits.argmax(dim=-1).cpu().numpy()
    model.train()
    metrics = classification_metrics([classes[i] for i in split.labels], [classes[i] for i in predictions], classes)
    return loss_sum / max(len(split), 1), metrics


def _checkpoint(store, accelerator, model, optimizer, scheduler, state, best, run_identity) -> str | None:
    """Write a checkpoint from rank 0 (every rank's RNG state gathered into it)."""
    if store is None:
        return None
    rng = _gather_rng(accelerator)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    optimizer_tensors, optimizer_meta = optimizer_payload(optimizer.optimizer)
    tensors = {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer_tensors, "rng": rng}
    if best:
        tensors["best"] = best
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    payload = {"identity": run_identity, "loop": asdict(state), "optimizer": optimizer_meta,
               "scheduler": _json_safe(scheduler.state_dict()), "scaler": scaler}
    uri = store.save(state.global_step, tensors, payload)
    accelerator.wait_for_everyone()
    return uri


def _resume(store, run_identity, accelerator, model, optimizer, scheduler, state, log) -> dict:
    """Load the latest complete checkpoint of this run and task into the loop; return best weights."""
    checkpoint = store.latest(run_identity)
    if checkpoint is None:
        return {}
    saved = checkpoint.state()
    accelerator.unwrap_model(model).load_state_dict(checkpoint.tensors("model"))
    restore_optimizer(optimizer.optimizer, checkpoint.tensors("optimizer"), saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    for key, value in saved["loop"].items():
        setattr(state, key, value)
    state.resumed_from_step = checkpoint.step
    rng = checkpoint.tensors("rng")
    own = f"rank{accelerator.process_index}."
    torch.set_rng_state(rng[own + "torch_cpu"])
    if torch.cuda.is_available() and own + "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[own + "torch_cuda"])
    if accelerator.is_main_process:
        log(f"finetune: resuming from checkpoint {checkpoint.uri} (step {checkpoint.step}, epoch {state.epoch}, "
            f"{state.step_in_epoch} steps into it)")
    return checkpoint.tensors("best") if checkpoint.has("best") else {}


def _gather_rng(accelerator) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    if accelerator.num_processes == 1:
        return {f"rank0.{key}": value for key, value in states.items()}
    gathered = {}
    for key, value in states.items():
        parts = [torch.empty_like(value) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(parts, value.to(accelerator.device) if key == "torch_cuda" else value)
        gathered.update({f"rank{rank}.{key}": part.cpu() for rank, part in enumerate(parts)})
    return gathered


def _reduce(accelerator, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _report_progress(state, epochs, steps, total_steps, steps_at_start, started, log) -> None:
    done = state.global_step - steps_at_start
    elapsed = time.monotonic() - started
    eta = elapsed / max(done, 1) * max(total_steps - state.global_step, 0)
    loss = state.loss_sum / max(state.loss_rows, 1)
    log(f"finetune: epoch {state.epoch}/{epochs} step {state.step_in_epoch}/{steps} loss {loss:.4f} "
        f"elapsed {elapsed:.0f}s eta {eta:.0f}s")


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.item()
    return None  # functions (LambdaLR's lambdas) are rebuilt from the config, not saved


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each optimizer step (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: the platform's default handling stays
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def torch_threads_for(processes: int) -> int:
    """CPU threads per process when N processes share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)

