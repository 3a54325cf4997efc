"""Fine-tuning for sequence classification (full or LoRA via peft): data and model in, Model out.

Writes the Model contract: a Hugging Face checkpoint (safetensors, tokenizer, config) plus
``tuneloop.json`` holding the best epoch's metrics, the epoch it came from, per-class metrics, the
precision, the process count and, after a resume, the step training resumed from.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from transformers.utils import logging as transformers_logging

from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.dp import train_private, with_privacy
from tuneloop.config import TrainingConfig, TuneloopConfig, resolve_base_model
from tuneloop.datasets import load_split
from tuneloop.errors import ConfigError, DataError, ModelError, TrainingError
from tuneloop.training import distributed
from tuneloop.training.checkpoints import CheckpointStore
from tuneloop.training.data import encode_split
from tuneloop.training.loop import identity, torch_threads_for, train_model


@dataclass
class TrainingSummary:
    """What fine-tuning did: sizes, time, the best epoch's validation metrics, and how it ran."""

    train_rows: int
    validation_rows: int
    epochs: int
    seconds: float
    device: str
    validation_metrics: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_step: int = 0
    processes: int = 1
    precision: str = "fp32"
    train_seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def samples_per_second(self) -> float:
        """Training rows per second of the whole loop (validation and checkpoints included)."""
        return self.train_rows * self.epochs_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def train_samples_per_second(self) -> float:
        """Training rows per second of the optimizer steps alone (a resumed run: its own steps only)."""
        return self.train_rows * self.epochs_run / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_metrics(self) -> dict[str, float]:
        """Flat numbers for a KFP ``Metrics`` artifact (per-class F1 included)."""
        fallback = self.history[-1] if self.history else {}
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), fallback)
        metrics = {
            "train_rows": float(self.train_rows),
            "training_seconds": round(self.seconds, 1),
            "train_samples_per_second": round(self.samples_per_second, 2),
            "best_epoch": float(self.best_epoch),
            "resumed_from_step": float(self.resumed_from_step),
            "validation_accuracy": self.validation_metrics["accuracy"],
            "validation_macro_f1": self.validation_metrics["macro_f1"],
            "validation_loss": best.get("validation_loss", float("nan")),
        }
        for label, values in self.validation_metrics.get("per_class", {}).items():
            metrics[f"validation_f1_{label}"] = values["f1"]
        if "epsilon" in best:  # DP-SGD (tuneloop.dp): the privacy spent by the kept (last) epoch
            metrics["dp_epsilon"] = best["epsilon"]
        return metrics

    @classmethod
    def from_model_dir(cls, directory: str | Path) -> "TrainingSummary":
        """Rebuild the summary from a written Model directory (after torchrun or a TrainJob)."""
        metadata = read_metadata(directory)
        run = metadata["metrics"]["run"]
        return cls(run["train_rows"], run["validation_rows"], metadata["training"]["epochs"],
                   metadata["metrics"]["training_seconds"], metadata["device"], metadata["metrics"]["validation"],
                   metadata["metrics"]["history"], metadata["metrics"]["best_epoch"], run["stopped_early"],
                   run["resumed_from_step"], run["processes"], run["precision"], run.get("train_seconds", 0.0))


def run(
    config: TuneloopConfig,
    dataset_path: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    data_fingerprint: str = "",
    pipeline_run: str = "",
    task: str = "finetune",
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainingSummary:
    """Fine-tune the base model on the train split and write the Model directory.

    With ``training.processes`` above 1 this starts ``torchrun`` and returns once its ranks are done.

    Args:
        config: the project config; ``training`` holds the defaults.
        dataset_path: the Dataset artifact (Parquet with a ``split`` column).
        output_dir: where the Model directory is written.
        base_model, epochs, learning_rate: per-run overrides (empty/0/None keep the config value).
        data_fingerprint: the validated data's fingerprint, recorded for lineage and checkpoints.
        pipeline_run, task: the checkpoint key; empty ``pipeline_run`` means no checkpoints.
        on_step: called with the global step after each optimizer step (progress hooks, tests).
        on_epoch: called with each epoch's history entry after validation (search pruning); it
            may raise to stop training (one process only).
        log: where progress lines go (default: stdout, flushed).

    Raises:
        ConfigError: the base model does not exist, patience is not below the epochs, or more
            processes are asked for than this machine has devices or cores.
        DataError: the dataset lacks a split or holds labels outside ``data.classes``.
        TrainingError: the loss became NaN, a checkpoint belongs to another model/config, or SIGTERM.
    """
    settings = with_overrides(config.training, base_model, epochs, learning_rate)
    if settings.processes > 1 and not distributed.inside_torchrun():
        distributed.check_processes(settings.processes)
        launched = config.model_copy(update={"training": settings})
        distributed.launch(launched, dataset_path, output_dir, data_fingerprint=data_fingerprint,
                           pipeline_run=pipeline_run, task=task)
        return TrainingSummary.from_model_dir(output_dir)
    return _train_here(config, settings, dataset_path, output_dir, data_fingerprint, pipeline_run, task, on_step,
                       on_epoch, log or _print)


def _train_here(config, settings, dataset_path, output_dir, data_fingerprint, pipeline_run, task, on_step,
                on_epoch, log):
    checkpoint = resolve_base_model(settings.base_model)
    classes = config.data.classes
    train = _limit_rows(load_split(dataset_path, "train"), settings.max_train_rows, settings.seed)
    validation = load_split(dataset_path, "validation")
    text_column, label_column = config.data.text_column, config.data.label_column
    for name, frame in (("train", train), ("validation", validation)):
        _check_labels(frame, label_column, classes, name)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    if settings.torch_threads or world > 1:
        torch.set_num_threads(settings.torch_threads or torch_threads_for(world))
    set_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = _load_model(checkpoint, classes, settings)
    train_split = encode_split(tokenizer, train, text_column, label_column, classes, settings.max_length)
    validation_split = encode_split(tokenizer, validation, text_column, label_column, classes, settings.max_length)
    store = None
    if pipeline_run:
        store = CheckpointStore(checkpoint_root(config), pipeline_run, task, keep=settings.keep_checkpoints, log=log)
    if is_main:
        log(f"finetune: {settings.method} fine-tuning of {settings.base_model} on {device} x{world}: "
            f"{len(train)} train / {len(validation)} validation rows, {settings.epochs} epochs"
            + (f", checkpoints in {store.uri(store.prefix)}" if store else ""))
    started = time.monotonic()
    spent = None
    if settings.privacy.dp:  # DP-SGD (tuneloop.dp): Poisson batches, per-example clipping, noise; no checkpoints
        result, spent = train_private(model, tokenizer, train_split, validation_split, classes, settings, log=log)
    else:
        result = train_model(model, tokenizer, train_split, validation_split, classes, settings, store=store,
                             run_identity=identity(settings, classes, len(train), data_fingerprint), on_step=on_step,
                             on_epoch=on_epoch, log=log)
    seconds = time.monotonic() - started
    state = result.state
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    summary = TrainingSummary(len(train), len(validation), settings.epochs, seconds, device, best["validation"],
                              state.history, state.best_epoch, state.stopped_early, state.resumed_from_step,
                              result.world_size, result.precision, state.train_seconds)
    if is_main:
        model.load_state_dict(result.best_weights)
        _save(_merge_adapters(model, settings).to("cpu"), tokenizer, output_dir)
        write_metadata(output_dir, with_privacy(_metadata(config, settings, summary, data_fingerprint,
                                                          result.checkpoint), dataset_path, spent))
        if store is not None and not settings.keep_checkpoints_on_success:
            store.clear()  # the model is written: a retry or a local resume reuses it, not the checkpoints
        log(f"finetune: done in {seconds:.0f}s ({summary.samples_per_second:.1f} samples/s), best epoch "
            f"{state.best_epoch} validation macro-F1 {best['validation']['macro_f1']:.4f}"
            + (f", resumed from step {state.resumed_from_step}" if state.resumed_from_step else ""))
    return summary


def _metadata(config, settings, summary: TrainingSummary, data_fingerprint: str, checkpoint: str | None) -> dict:
    return {
        "kind": "model",
        "labels": config.data.classes,
        "max_length": settings.max_length,
        "base_model": settings.base_model,
        "data_fingerprint": data_fingerprint,
        "text_column": config.data.text_column,
        "label_column": config.data.label_column,
        "training": settings.model_dump(mode="json"),
        "metrics": {
            "validation": summary.validation_metrics,
            "best_epoch": summary.best_epoch,
            "history": summary.history,
            "training_seconds": round(summary.seconds, 1),
            "run": {"train_rows": summary.train_rows, "validation_rows": summary.validation_rows,
                    "stopped_early": summary.stopped_early, "resumed_from_step": summary.resumed_from_step,
                    "processes": summary.processes, "precision": summary.precision, "last_checkpoint": checkpoint,
                    "samples_per_second": round(summary.samples_per_second, 2),
                    "train_seconds": round(summary.train_seconds, 1)},
        },
        "device": summary.device,
    }


def checkpoint_root(config: TuneloopConfig) -> str:
    """``training.checkpoint_uri``, else ``<state_dir>/checkpoints``."""
    return config.training.checkpoint_uri or str(Path(config.state_dir) / "checkpoints")


def with_overrides(settings: TrainingConfig, base_model: str | None, epochs: int | None,
                   learning_rate: float | None) -> TrainingConfig:
    """The training settings with per-run overrides applied (and re-validated).

    Raises:
        ConfigError: the overrides make the settings invalid (patience not below the epochs).
    """
    updated = settings.model_dump()
    if base_model:
        updated["base_model"] = base_model
    if epochs:
        updated["epochs"] = epochs
    if learning_rate:
        updated["learning_rate"] = learning_rate
    try:
        return TrainingConfig.model_validate(updated)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"training{'.' + location if location else ''}: {message}", stage="training",
                          field=f"training.{location}" if location else "training") from None


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


def _save(model, tokenizer, output_dir: str | Path) -> None:
    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def _print(line: str) -> None:
    print(line, flush=True)


def finetune_step(config: TuneloopConfig, dataset_path: str | Path, output_dir: str | Path,
                  **options) -> TrainingSummary:
    """What the ``finetune`` component runs: train here (``training.backend: pod``) or launch,
    wait for and read back a Kubeflow Trainer ``TrainJob`` (``trainjob``). Options as in :func:`run`."""
    from tuneloop.local_resume import CHECKPOINT_RUN_ENV

    # A resumed local run keeps the checkpoints of the run it resumes.
    options["pipeline_run"] = os.environ.get(CHECKPOINT_RUN_ENV) or options.get("pipeline_run", "")
    if config.training.backend == "trainjob":
        from tuneloop.training import trainjob

        return trainjob.train(config, dataset_path, output_dir, **options)
    return run(config, dataset_path, output_dir, **options)
