"""Compression: build candidate variants, measure them side by side, keep the fastest within budget.

The fine-tuned checkpoint (the teacher) is exported to ONNX (:mod:`.export`: dynamic batch and
sequence axes, eager attention, checked with ``onnx.checker`` and against the torch logits). From
that export the stage builds the candidates that ``compression.variants`` lists (:mod:`.quantize`,
:mod:`.build`):

- ``onnx_fp32``: the export itself. Always built and measured: the CPU fallback.
- ``onnx_fp32_fused``: ONNX Runtime's transformer optimizer (model type ``bert``) fuses attention,
  skip + layer norm and bias + GELU; the embedding fusion stays off so the table stays quantizable.
- ``onnx_int8_dynamic``: int8 weights (per channel) for ``MatMul`` and ``Gather``, activations
  quantized at run time, on the plain export (ONNX Runtime fuses the plain graph itself at load).
- ``onnx_int8_static``: QDQ int8 (uint8 activations, per-channel int8 weights, weight ``MatMul``\\s
  and ``Gather``), MinMax-calibrated on ``compression.calibration_rows`` validation texts (capped at
  the split, with a recorded note), one text per calibration run so no padding enters the ranges.
- ``onnx_int8_emb4``: dynamic int8 dense layers with 4-bit block-quantized embedding tables
  (``GatherBlockQuantized``): the table is half of MiniLM-L6's weights.
- ``tensorrt_fp16``, ``tensorrt_int8``: TensorRT engines (:mod:`tuneloop.tensorrt_engine`), built
  only where a CUDA device and TensorRT are present and ``deployment.device`` is ``cuda``.

Smaller students, each exported and given the same recipes (``<student>_fp32``, ``_fp32_fused``,
``_int8`` = dynamic int8, ``_int8_static``, ``_int8_emb4``, ``_tensorrt_fp16``, ``_tensorrt_int8``):

- ``distilled_*`` (:mod:`.distillation`): fewer encoder layers initialised from the teacher's,
  trained on the train split with the teacher's temperature-scaled soft targets mixed with the
  labels (``compression.distillation``), optionally on extra unlabelled train-split texts.
- ``pruned_*`` (:mod:`.pruning`): attention heads and feed-forward neurons (or whole layers)
  removed by Taylor importance on validation rows, then a short recovery fine-tune on soft targets
  (``compression.pruning``): a smaller dense model, not a mask.

A candidate that cannot be built is skipped with its reason logged and recorded under ``skipped``;
the export itself failing, an unsupported teacher for a listed student, or too few rows to distil
are errors.

Measurement (:mod:`.measure`), in one process on the same validation rows: macro-F1 and argmax
agreement with the teacher (torch fp32) on every row; latency on the first
``compression.latency_rows`` texts at ``compression.latency_batch_sizes``, ``latency_repeats``
rounds with the variants interleaved, median ms of one ``predict_proba`` call (tokenisation
included); file size; build seconds (for a student's variants: its training and export too).

Choice (:mod:`.choose`): only variants that run on ``deployment.device`` are eligible (cpu: ONNX
Runtime, measured on CPU even in a GPU step; cuda: TensorRT). Among them, those whose validation
macro-F1 loss against the teacher is at most ``compression.max_f1_loss_points``; the fastest by the
geometric mean of latency relative to ONNX fp32 over the batch sizes wins; within 5% is a tie won
by the smallest file. When none fits, the fallback is kept and the reason names every loss. Every
candidate's numbers, the ranking and the reason land in the Compressed Model's ``tuneloop.json``.
"""

from tuneloop.compression.build import build_candidates, load_candidate
from tuneloop.compression.choose import (
    SELECTION_RULE,
    SELECTION_TIE_MARGIN,
    Selection,
    choose_variant,
    eligible_variants,
)
from tuneloop.compression.export import export_onnx
from tuneloop.compression.measure import (
    SCORING_BATCH_SIZE,
    checkpoint_size,
    measure_latencies,
    measure_latency,
    score_variant,
)
from tuneloop.compression.quantize import (
    QUANTIZED_OP_TYPES,
    calibration_sample,
    fuse_transformer_graph,
    quantize_int8,
    quantize_int8_static,
)
from tuneloop.compression.stage import CompressionSummary, run
from tuneloop.compression.variants import (
    CPU_VARIANTS,
    FP32_FILE,
    INT8_FILE,
    ONNX_FP32,
    ONNX_FP32_FUSED,
    ONNX_INT8,
    ONNX_INT8_DYNAMIC,
    ONNX_INT8_EMB4,
    ONNX_INT8_STATIC,
    TENSORRT_FP16,
    TENSORRT_INT8,
    TENSORRT_VARIANTS,
    TORCH_FP32,
    VARIANT_FILES,
    VARIANT_PRECISION,
    VARIANTS,
    Candidate,
)

__all__ = [
    "CPU_VARIANTS", "FP32_FILE", "INT8_FILE", "ONNX_FP32", "ONNX_FP32_FUSED", "ONNX_INT8", "ONNX_INT8_DYNAMIC",
    "ONNX_INT8_EMB4", "ONNX_INT8_STATIC", "QUANTIZED_OP_TYPES", "SCORING_BATCH_SIZE", "SELECTION_RULE",
    "SELECTION_TIE_MARGIN", "TENSORRT_FP16", "TENSORRT_INT8", "TENSORRT_VARIANTS", "TORCH_FP32", "VARIANTS",
    "VARIANT_FILES", "VARIANT_PRECISION", "Candidate", "CompressionSummary", "Selection", "build_candidates",
    "calibration_sample", "checkpoint_size", "choose_variant", "eligible_variants", "export_onnx",
    "fuse_transformer_graph", "load_candidate", "measure_latencies", "measure_latency", "quantize_int8",
    "quantize_int8_static", "run", "score_variant",
]
