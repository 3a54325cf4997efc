"""Config sections of compression: the variants built, the distilled and pruned students, the accuracy budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.base import StrictModel


COMPRESSION_VARIANTS = Literal[
    "onnx_fp32", "onnx_fp32_fused", "onnx_int8_dynamic", "onnx_int8_static", "onnx_int8_emb4", "tensorrt_fp16",
    "tensorrt_int8", "distilled_fp32", "distilled_fp32_fused", "distilled_int8", "distilled_int8_static",
    "distilled_int8_emb4", "distilled_tensorrt_fp16", "distilled_tensorrt_int8", "pruned_fp32", "pruned_fp32_fused",
    "pruned_int8", "pruned_int8_static", "pruned_int8_emb4", "pruned_tensorrt_fp16", "pruned_tensorrt_int8",
]
"""Teacher variants, then each student's (``<distilled|pruned>_<recipe>``; ``int8`` is dynamic int8)."""


class DistillationConfig(StrictModel):
    """The distilled student (variants ``distilled_*``): fewer layers initialised from the teacher's
    own, trained on the teacher's soft targets mixed with the labels."""

    student_layers: int = Field(3, ge=1, description="Encoder layers the student keeps (fewer than the teacher's).")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of the soft targets.")
    soft_weight: float = Field(0.7, ge=0.0, le=1.0,
                               description="Share of the loss from the soft targets; the rest is cross-entropy.")
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(32, ge=1)
    min_train_rows: int = Field(200, ge=1, description="Fewer train rows than this is an error: too few to learn.")
    unlabelled_texts: bool = Field(False, description="Also learn from data.texts rows without a label (train "
                                   "split by key hash) on soft targets only.")
    max_unlabelled_rows: int = Field(10_000, ge=1)
    seed: int = 0


class PruningConfig(StrictModel):
    """The pruned model (variants ``pruned_*``): heads and feed-forward neurons, or whole layers,
    removed by importance on validation rows, then a short recovery fine-tune on soft targets."""

    unit: Literal["heads_and_neurons", "layers"] = "heads_and_neurons"
    share: float = Field(0.5, gt=0.0, lt=1.0, description="Share of heads and neurons (or layers) removed, in (0, 1).")
    importance_rows: int = Field(256, ge=1, description="Validation rows that score importance.")
    recovery_epochs: int = Field(1, ge=0, description="Recovery fine-tune epochs on the train split (0: none).")
    learning_rate: float = Field(5e-5, gt=0.0)
    batch_size: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0.0)
    soft_weight: float = Field(0.7, ge=0.0, le=1.0)
    seed: int = 0


class CompressionConfig(StrictModel):
    """Which compressed variants to build, how to measure them, and the accuracy budget.

    ``variants`` lists the candidates the compress step builds and measures next to torch fp32 and
    ONNX fp32 (always measured: the fallback). The fastest candidate whose validation macro-F1 loss
    against torch fp32 stays within ``max_f1_loss_points`` is kept. The ONNX Runtime (CPU) variants
    run everywhere; the TensorRT ones are tried only where a CUDA device and TensorRT are present and
    are otherwise skipped with a logged reason.

    ``quantize`` is the older switch, still accepted: ``int8_dynamic`` changes nothing (the
    ``variants`` list decides), ``none`` removes every int8 variant from ``variants``.

    ``distilled_*`` and ``pruned_*`` variants start from a smaller student (``distillation``,
    ``pruning``) that is exported and quantised like the teacher. Only variants that run on
    ``deployment.device`` are built and may be kept.
    """

    variants: list[COMPRESSION_VARIANTS] = Field(
        ["onnx_fp32", "onnx_fp32_fused", "onnx_int8_dynamic", "onnx_int8_static", "onnx_int8_emb4", "tensorrt_fp16",
         "tensorrt_int8"],
        description="Candidate variants to build and measure (TensorRT ones only where CUDA + TensorRT exist).",
    )
    quantize: Literal["int8_dynamic", "none"] | None = Field(
        None, description="Deprecated: 'none' drops the int8 variants; 'int8_dynamic' leaves `variants` as given."
    )
    max_f1_loss_points: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Largest validation macro-F1 loss (in points) against torch fp32 a kept variant may cost.",
    )
    calibration_rows: int = Field(
        100, ge=1, description="Validation texts that calibrate static int8 (capped at the validation split)."
    )
    opset: int = Field(17, ge=13)
    latency_batch_sizes: list[int] = Field([1, 32], min_length=1)
    latency_repeats: int = Field(5, ge=1)
    latency_rows: int = Field(64, ge=1, description="Validation texts in the fixed latency sample.")
    distillation: DistillationConfig = DistillationConfig()
    pruning: PruningConfig = PruningConfig()

    @field_validator("latency_batch_sizes")
    @classmethod
    def _positive_batches(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError(f"batch sizes must be at least 1, got {sizes}")
        return sizes

    @model_validator(mode="before")
    @classmethod
    def _quantize_none_drops_int8(cls, data: Any) -> Any:
        """``quantize: none`` (the older switch) means: no int8 variant. It fills ``variants`` with the
        default list less the int8 ones, and contradicts an explicit list that names one."""
        if not isinstance(data, dict) or data.get("quantize") != "none":
            return data
        if "variants" not in data:
            default = cls.model_fields["variants"].default
            return {**data, "variants": [name for name in default if "int8" not in name]}
        listed = data["variants"] if isinstance(data["variants"], list) else []
        int8 = [name for name in listed if isinstance(name, str) and "int8" in name]
        if int8:
            raise ValueError(f"quantize: none contradicts the int8 variants {int8} listed in variants; drop one")
        return data

    def candidates(self) -> list[str]:
        """The variants to try, in the configured order, without repeats."""
        return list(dict.fromkeys(self.variants))
