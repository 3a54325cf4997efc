"""Compression: build candidate variants, measure them side by side, keep the fastest within budget.

The fine-tuned checkpoint is exported to ONNX (dynamic batch and sequence axes; attention exported in
its eager form, the pattern ONNX Runtime's transformer optimizer fuses), checked with
``onnx.checker`` and against the torch logits. From that export the stage builds the candidates that
``compression.variants`` lists:

- ``onnx_fp32``: the export itself. Always built and measured: it is the fallback.
- ``onnx_fp32_fused``: ``onnxruntime.transformers.optimizer.optimize_model`` (model type ``bert``,
  ``num_heads`` and ``hidden_size`` from the Hugging Face config) fuses attention, skip + layer norm
  and bias + GELU into ONNX Runtime's contrib kernels. The embedding fusion stays off, so the
  embedding table remains a ``Gather`` the int8 recipes can quantize.
- ``onnx_int8_dynamic``: int8 weights (per channel) for ``MatMul`` and ``Gather``, activations
  quantized at run time. It quantizes the plain export, not the fused graph: on MiniLM-L6
  fine-tuned on SMS spam (2-core AMD EPYC with AVX512-VNNI) the fused graph quantized with
  ``QAttention`` scored the same macro-F1 and was no faster (batch 1: 1.38 against 1.41 ms; batch 32:
  125 against 112 ms), because the ONNX Runtime session applies its own transformer fusions to the
  plain graph as well.
- ``onnx_int8_static``: QDQ int8 with uint8 activations and per-channel int8 weights (the x86 VNNI
  fast path), for the weight ``MatMul``\\s (``MatMulConstBOnly``: attention's activation-by-activation
  products stay float) and ``Gather``. Activation ranges come from MinMax calibration on
  ``compression.calibration_rows`` validation texts (evenly spaced over the split), one text per
  calibration run so that no padding enters the ranges. When the validation split holds fewer rows
  than that, all of them calibrate, and a note is logged and recorded (``calibration.capped``):
  calibrating on fewer rows is a smaller harm than failing a run, and the split is the one the
  budget is checked on anyway. (Calibration and scoring share the validation split; calibration
  only sets activation ranges, the test split stays untouched for the evaluation gate.)
- ``tensorrt_fp16``, ``tensorrt_int8``: TensorRT engines (:mod:`tuneloop.tensorrt_engine`), built
  only where a CUDA device and TensorRT are present; elsewhere they are skipped with a logged
  reason (``TensorRT variants skipped: no CUDA device``) and the stage goes on.

A candidate that cannot be built is skipped with its reason logged and recorded under ``skipped``;
only the export itself failing is an error.

Measurement, in one process on the same texts:

- macro-F1 and argmax agreement with torch fp32 on every validation row (batches of 32);
- latency on a fixed sample, the first ``compression.latency_rows`` validation texts (all rows would
  cost minutes on 2 cores for no better choice): for each batch size the sample is cut into full
  batches, and ``compression.latency_repeats`` rounds time every batch once per variant, the
  variants interleaved within each round so that load from other processes falls on all of them
  alike. A variant's latency is the median milliseconds of one ``predict_proba`` call, tokenisation
  included.

Choice: among the variants (ONNX fp32 included) whose validation macro-F1 loss against torch fp32 is
at most ``compression.max_f1_loss_points``, the fastest by the geometric mean, over
``compression.latency_batch_sizes``, of its latency relative to ONNX fp32 (the default ``[1, 32]``
weighs batch 1 and batch 32 alike). Variants within 5% of the fastest count as equally fast (timing
noise); among them the smallest file wins. When no variant fits, ONNX fp32 is kept and the reason
names every variant's loss; the budget is never exceeded silently. Every variant's numbers, the
ranking and the reason land in the Compressed Model's ``tuneloop.json``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tuneloop import tensorrt_engine
from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.config import TuneloopConfig
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, DataError, ModelError
from tuneloop.metrics import macro_f1
from tuneloop.runtime import (
    MODEL_INPUTS,
    ONNX_FILE,
    BaseClassifier,
    OnnxClassifier,
    TorchClassifier,
    default_threads,
)

STAGE = "compression"
TORCH_FP32 = "torch_fp32"
ONNX_FP32 = "onnx_fp32"
ONNX_FP32_FUSED = "onnx_fp32_fused"
ONNX_INT8_DYNAMIC = "onnx_int8_dynamic"
ONNX_INT8_STATIC = "onnx_int8_static"
TENSORRT_FP16 = "tensorrt_fp16"
TENSORRT_INT8 = "tensorrt_int8"
ONNX_INT8 = ONNX_INT8_DYNAMIC
"""The int8 variant of earlier releases (dynamic quantization)."""
CPU_VARIANTS = (ONNX_FP32, ONNX_FP32_FUSED, ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC)
TENSORRT_VARIANTS = (TENSORRT_FP16, TENSORRT_INT8)
VARIANT_PRECISION = {
    ONNX_FP32: "fp32", ONNX_FP32_FUSED: "fp32", ONNX_INT8_DYNAMIC: "int8", ONNX_INT8_STATIC: "int8",
    TENSORRT_FP16: "fp16", TENSORRT_INT8: "int8",
}
VARIANT_FILES = {
    ONNX_FP32: "model_fp32.onnx", ONNX_FP32_FUSED: "model_fp32_fused.onnx",
    ONNX_INT8_DYNAMIC: "model_int8_dynamic.onnx", ONNX_INT8_STATIC: "model_int8_static.onnx",
    TENSORRT_FP16: "model_fp16.plan", TENSORRT_INT8: "model_int8.plan",
}
FP32_FILE = VARIANT_FILES[ONNX_FP32]
INT8_FILE = VARIANT_FILES[ONNX_INT8_DYNAMIC]
QUANTIZED_OP_TYPES = ["MatMul", "Gather"]
"""int8 weights for the dense layers (MatMul) and the embedding tables (Gather). Measured on MiniLM-L6
fine-tuned on SMS spam: per-channel MatMul weights cost 0.25 macro-F1 points where per-tensor cost 1.5;
adding Gather (embeddings) shrinks the file from 59 MB to 23 MB at no further loss."""
PER_CHANNEL = True
STATIC_CALIBRATION_METHOD = "MinMax"
"""Histogram calibrators (Entropy, Percentile) need equal shapes across calibration runs; texts differ
in length, and MinMax lost no more macro-F1 than per-tensor alternatives on MiniLM-L6."""
CALIBRATION_FLUSH = 16
"""Calibration runs whose intermediate outputs are kept before they are reduced (bounds memory)."""
SELECTION_TIE_MARGIN = 0.05
SELECTION_RULE = (
    "fastest within the macro-F1 budget: lowest geometric mean over the latency batch sizes of latency relative "
    f"to onnx_fp32; within {SELECTION_TIE_MARGIN:.0%} of the fastest counts as a tie, won by the smallest file"
)
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3
SCORING_BATCH_SIZE = 32
WARMUP_RUNS = 2
EXPORT_SAMPLE_TEXTS = [
    "a short text",
    "a somewhat longer text, so that the export batch holds padding",
]
PARITY_SAMPLE_TEXTS = [
    "x",
    "three texts of different lengths check the dynamic batch and sequence axes",
    "hello world",
]


@dataclass
class Candidate:
    """One built variant: its file in the scratch directory, how it runs, and how it was made."""

    name: str
    file: str
    runtime: str
    precision: str
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """The choice among measured variants, with the numbers it rests on."""

    chosen: str
    reason: str
    f1_loss_points: dict[str, float]
    relative_latency: dict[str, float]
    within_budget: list[str]


@dataclass
class CompressionSummary:
    """What compression measured and kept. Variant names: ``torch_fp32`` (the reference) and the
    candidates (``onnx_fp32``, ``onnx_fp32_fused``, ``onnx_int8_dynamic``, ``onnx_int8_static``,
    ``tensorrt_fp16``, ``tensorrt_int8``)."""

    chosen: str
    precision: str
    reason: str
    validation_rows: int
    macro_f1: dict[str, float]
    agreement_with_fp32: dict[str, float]
    size_bytes: dict[str, int]
    latency_ms: dict[str, dict[int, float]]
    macro_f1_change_points: float
    latency_speedup: dict[int, float]
    size_ratio: float
    exporter: str = ""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    skipped: dict[str, str] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, float]:
        """Flat numbers for a KFP ``Metrics`` artifact."""
        metrics: dict[str, float] = {
            "int8_chosen": 1.0 if self.precision == "int8" else 0.0,
            "macro_f1_change_points": float(self.macro_f1_change_points),
            "size_ratio": float(self.size_ratio),
            "validation_rows": float(self.validation_rows),
        }
        for name, value in self.macro_f1.items():
            metrics[f"validation_macro_f1_{name}"] = float(value)
        for name, value in self.agreement_with_fp32.items():
            if name != TORCH_FP32:
                metrics[f"agreement_with_fp32_{name}"] = float(value)
        for name, size in self.size_bytes.items():
            metrics[f"size_mb_{name}"] = round(size / 1e6, 3)
        for name, latencies in self.latency_ms.items():
            for batch, ms in latencies.items():
                metrics[f"latency_ms_{name}_batch{batch}"] = float(ms)
        for batch, speedup in self.latency_speedup.items():
            metrics[f"latency_speedup_batch{batch}"] = float(speedup)
        return metrics


def run(
    config: TuneloopConfig, model_dir: str | Path, dataset_path: str | Path, output_dir: str | Path
) -> CompressionSummary:
    """Export, build the candidate variants, measure them all, and write the Compressed Model directory.

    Args:
        config: the project config; ``compression`` holds the settings (``variants``,
            ``max_f1_loss_points``, ``calibration_rows``, latency settings).
        model_dir: the Model directory (Hugging Face checkpoint + ``tuneloop.json``).
        dataset_path: the Dataset artifact; its validation split is scored, timed (a fixed sample)
            and calibrates static int8 (``compression.calibration_rows`` rows, capped at the split's
            size with a logged note).
        output_dir: where the Compressed Model directory is written (``model.onnx`` or
            ``model.plan``, tokenizer, ``tuneloop.json``).

    Raises:
        ModelError: the Model directory or its metadata is missing or unusable.
        DataError: the dataset lacks a validation split or the text/label columns.
        CompressionError: the ONNX export failed (naming the model type).
    """
    settings = config.compression
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    source = _source_metadata(model_dir)
    labels = [str(label) for label in source["labels"]]
    max_length = int(source.get("max_length") or config.training.max_length)
    text_column = source.get("text_column") or config.data.text_column
    label_column = source.get("label_column") or config.data.label_column
    texts, truth = _validation_rows(dataset_path, text_column, label_column, labels)
    batch_sizes = sorted(set(settings.latency_batch_sizes))
    names = settings.candidates()
    calibrated = [name for name in names if name in (ONNX_INT8_STATIC, TENSORRT_INT8)]
    calibration_texts, calibration = calibration_sample(texts, settings.calibration_rows, log=bool(calibrated))

    with tempfile.TemporaryDirectory(prefix="tuneloop-compress-") as scratch:
        work = Path(scratch)
        torch_model = TorchClassifier(model_dir, labels=labels, max_length=max_length)
        torch_model.tokenizer.save_pretrained(work)
        _log(f"exporting {_model_type(torch_model)} to ONNX (opset {settings.opset})")
        exporter = export_onnx(torch_model, work / FP32_FILE, opset=settings.opset)
        _log(f"exported {FP32_FILE} with the {exporter} exporter ({_size(work / FP32_FILE) / 1e6:.1f} MB)")
        candidates, skipped = build_candidates(torch_model, work, names, calibration_texts, exporter=exporter)

        _log(f"scoring {len(texts)} validation rows; timing the first {min(settings.latency_rows, len(texts))} at "
             f"batch sizes {batch_sizes}, {settings.latency_repeats} interleaved rounds")
        reference = torch_model.predict(texts, batch_size=SCORING_BATCH_SIZE)
        classifiers: dict[str, BaseClassifier] = {TORCH_FP32: torch_model}
        variants = {TORCH_FP32: score_variant(TORCH_FP32, reference, truth, reference, labels)}
        variants[TORCH_FP32]["size_bytes"] = checkpoint_size(model_dir)
        for name, candidate in candidates.items():
            classifiers[name] = load_candidate(candidate, work, labels=labels, max_length=max_length)
            predictions = classifiers[name].predict(texts, batch_size=SCORING_BATCH_SIZE)
            variants[name] = score_variant(name, predictions, truth, reference, labels)
            variants[name]["size_bytes"] = _size(work / candidate.file)
        sample = texts[: settings.latency_rows]
        latencies = measure_latencies(classifiers, sample, batch_sizes, settings.latency_repeats)
        for name, latency in latencies.items():
            variants[name]["latency_ms"] = latency
            _log(f"{name}: " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in latency.items())
                 + f", {variants[name]['size_bytes'] / 1e6:.1f} MB")
        del classifiers, torch_model

        selection = choose_variant(variants, max_loss_points=settings.max_f1_loss_points, batch_sizes=batch_sizes)
        reason = selection.reason
        if settings.quantize == "none":
            reason = f"quantization is off (compression.quantize: none); {reason}"
        kept = candidates[selection.chosen]
        _log(f"kept {selection.chosen}: {reason}")
        target = tensorrt_engine.PLAN_FILE if kept.runtime == "tensorrt" else ONNX_FILE
        _write_output(output_dir, work / kept.file, target, tokenizer_dir=work)

    summary = _summary(selection.chosen, kept, reason, variants, batch_sizes, len(texts), exporter, skipped)
    metadata = {
        "kind": "compressed_model",
        "runtime": kept.runtime,
        "precision": kept.precision,
        "labels": labels,
        "max_length": max_length,
        "base_model": source.get("base_model", ""),
        "data_fingerprint": source.get("data_fingerprint", ""),
        "text_column": text_column,
        "label_column": label_column,
        "source_metrics": source.get("metrics", {}),
        "variants": summary.variants,
        "macro_f1_change_points": summary.macro_f1_change_points,
        "latency_speedup": {str(batch): value for batch, value in summary.latency_speedup.items()},
        "size_ratio": summary.size_ratio,
        "chosen": selection.chosen,
        "reason": reason,
        "validation_rows": len(texts),
        "selection": {
            "rule": SELECTION_RULE,
            "max_f1_loss_points": settings.max_f1_loss_points,
            "latency_batch_sizes": batch_sizes,
            "f1_loss_points": selection.f1_loss_points,
            "relative_latency": selection.relative_latency,
            "within_budget": selection.within_budget,
        },
        "measurement": {
            "scored_rows": len(texts),
            "latency_rows": min(settings.latency_rows, len(texts)),
            "latency_repeats": settings.latency_repeats,
            "scoring_batch_size": SCORING_BATCH_SIZE,
            "threads": default_threads(),
        },
        "export": {"exporter": exporter, "opset": settings.opset},
        "recipes": {name: candidate.recipe for name, candidate in candidates.items()},
        "quantization": {**kept.recipe, "max_f1_loss_points": settings.max_f1_loss_points}
        if kept.precision == "int8" else {"method": "none"},
        "calibration": calibration if calibrated else None,
        "skipped": skipped,
    }
    tensorrt = next((c.recipe for c in candidates.values() if c.runtime == "tensorrt"), None)
    if kept.runtime == "tensorrt":
        tensorrt = kept.recipe
    if tensorrt is not None:
        keys = ("version", "gpu", "compute_capability")
        metadata["tensorrt"] = {key: tensorrt[key] for key in keys if key in tensorrt}
    elif any(name in TENSORRT_VARIANTS for name in names):
        metadata["tensorrt"] = {"skipped": next(skipped[n] for n in names if n in TENSORRT_VARIANTS)}
    write_metadata(output_dir, metadata)
    _log(f"wrote {output_dir} ({selection.chosen}, {summary.precision}, {summary.size_ratio:.2f}x the checkpoint "
         f"size, macro-F1 change {summary.macro_f1_change_points:+.2f} points)")
    return summary


def build_candidates(
    torch_model: TorchClassifier,
    work: Path,
    names: Sequence[str],
    calibration_texts: Sequence[str],
    *,
    exporter: str = "",
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Build the requested variants next to ``work / model_fp32.onnx`` (the export).

    ONNX fp32 is always included. TensorRT variants are skipped, with one logged reason, where no
    CUDA device or no TensorRT is present; any other variant that fails to build is skipped with
    its error.

    Returns:
        ``(candidates by name, skipped variant -> reason)``.
    """
    fp32 = work / FP32_FILE
    candidates = {ONNX_FP32: Candidate(ONNX_FP32, FP32_FILE, "onnxruntime", "fp32",
                                       {"method": "export", "exporter": exporter})}
    skipped: dict[str, str] = {}
    wanted_tensorrt = [name for name in names if name in TENSORRT_VARIANTS]
    if wanted_tensorrt:
        why = tensorrt_engine.unavailable_reason()
        if why:
            _log(f"TensorRT variants skipped: {why}")
            skipped.update({name: why for name in wanted_tensorrt})
    input_names = _input_names(torch_model)
    builders: dict[str, Callable[[Path], dict[str, Any]]] = {
        ONNX_FP32_FUSED: lambda out: fuse_transformer_graph(fp32, out, torch_model.model.config),
        ONNX_INT8_DYNAMIC: lambda out: quantize_int8(fp32, out),
        ONNX_INT8_STATIC: lambda out: quantize_int8_static(
            fp32, out, tokenizer=torch_model.tokenizer, texts=calibration_texts, input_names=input_names,
            max_length=torch_model.max_length),
        TENSORRT_FP16: lambda out: tensorrt_engine.build_engine(
            fp32, out, precision="fp16", tokenizer=torch_model.tokenizer, max_length=torch_model.max_length),
        TENSORRT_INT8: lambda out: tensorrt_engine.build_engine(
            fp32, out, precision="int8", tokenizer=torch_model.tokenizer, max_length=torch_model.max_length,
            calibration_texts=calibration_texts),
    }
    for name in names:
        if name in candidates or name in skipped:
            continue
        path = work / VARIANT_FILES[name]
        started = time.perf_counter()
        try:
            recipe = builders[name](path) or {}
        except Exception as error:  # an optional candidate failing to build must not fail the stage
            skipped[name] = f"could not build it: {type(error).__name__}: {_first_line(error)}"
            _log(f"{name} skipped: {skipped[name]}")
            path.unlink(missing_ok=True)
            continue
        runtime = "tensorrt" if name in TENSORRT_VARIANTS else "onnxruntime"
        candidates[name] = Candidate(name, path.name, runtime, VARIANT_PRECISION[name], recipe)
        _log(f"built {name} ({_size(path) / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return candidates, skipped


def load_candidate(candidate: Candidate, work: Path, *, labels: list[str], max_length: int) -> BaseClassifier:
    """A classifier on one built variant in the scratch directory."""
    if candidate.runtime == "tensorrt":
        return tensorrt_engine.TensorRTClassifier(work, engine_file=candidate.file, labels=labels,
                                                  max_length=max_length)
    return OnnxClassifier(work, model_file=candidate.file, labels=labels, max_length=max_length)


def calibration_sample(texts: Sequence[str], rows: int, *, log: bool = True) -> tuple[list[str], dict[str, Any]]:
    """``rows`` texts evenly spaced over the validation split, for static int8 calibration.

    Asking for more rows than the split holds is not an error: every row calibrates, and a note
    says so (logged when ``log``, and in the returned record as ``capped`` and ``note``).
    """
    available = len(texts)
    take = min(rows, available)
    note = None
    if rows > available:
        note = (f"compression.calibration_rows is {rows} but the validation split holds {available} rows; "
                f"calibrating on all {available}")
        if log:
            _log(f"note: {note}")
    indices = np.linspace(0, available - 1, take).round().astype(int) if take else np.array([], dtype=int)
    record = {"requested_rows": rows, "rows": take, "capped": rows > available, "note": note,
              "sample": "evenly spaced over the validation split"}
    return [texts[i] for i in indices], record


def choose_variant(
    variants: Mapping[str, Mapping[str, Any]],
    *,
    max_loss_points: float,
    batch_sizes: Sequence[int],
    reference: str = TORCH_FP32,
    fallback: str = ONNX_FP32,
) -> Selection:
    """Keep the fastest variant whose macro-F1 loss against ``reference`` is within the budget.

    Args:
        variants: measured variants by name, each with ``macro_f1`` (a share in [0, 1]),
            ``latency_ms`` ({batch size: ms}) and ``size_bytes``; must hold ``reference`` and
            ``fallback``.
        max_loss_points: the budget, in points (100 x the F1 difference); a gain is never a loss.
        batch_sizes: the batch sizes whose latencies rank the variants.

    Returns:
        the :class:`Selection`: the variant kept, why, and the numbers behind it.
    """
    reference_f1 = variants[reference]["macro_f1"]
    names = [name for name in variants if name != reference]
    losses = {name: _loss_points(reference_f1, variants[name]["macro_f1"]) for name in names}
    scores = {name: _relative_latency(variants[name], variants[fallback], batch_sizes) for name in names}
    fits = sorted((name for name in names if losses[name] <= max_loss_points), key=lambda n: (scores[n], n))
    over = [name for name in names if name not in fits]
    budget = f"the budget of {max_loss_points:g} points (compression.max_f1_loss_points)"
    over_text = "; ".join(f"{name} would lose {losses[name]:.2f} validation macro-F1 points against torch fp32"
                          for name in over)

    if not fits:
        reason = (f"no variant fits {budget}, not even ONNX fp32: {over_text}, over the budget of "
                  f"{max_loss_points:g} points; kept ONNX fp32 and left the loss to the evaluation gate")
        return Selection(fallback, reason, losses, scores, [])

    fastest = fits[0]
    ties = [name for name in fits if scores[name] <= scores[fastest] * (1.0 + SELECTION_TIE_MARGIN)]
    chosen = min(ties, key=lambda n: (variants[n]["size_bytes"], scores[n], n))
    numbers = (", ".join(f"{_ms(variants[chosen], b):.2f} ms at batch {b}" for b in batch_sizes) + " ("
               + ", ".join(f"{_speedup(variants[reference], variants[chosen], b)} torch fp32 at batch {b}"
                           for b in batch_sizes) + ")")
    if chosen == fallback and over:
        reason = (f"{over_text}, over the budget of {max_loss_points:g} points (compression.max_f1_loss_points); "
                  f"kept ONNX fp32: {numbers}")
        others = [name for name in fits if name != chosen]
        if others:
            reason += f"; within the budget but not faster: {', '.join(others)}"
        return Selection(chosen, reason, losses, scores, fits)
    reason = (f"{chosen} is the fastest variant within {budget}: it changes validation macro-F1 by "
              f"{0.0 - losses[chosen]:+.2f} points against torch fp32; latency {numbers}")
    if chosen != fastest:
        reason += (f"; {fastest} was as fast within {SELECTION_TIE_MARGIN:.0%} (timing noise) and the smaller file "
                   f"won ({variants[chosen]['size_bytes'] / 1e6:.1f} against "
                   f"{variants[fastest]['size_bytes'] / 1e6:.1f} MB)")
    runner_up = next((name for name in fits if name != chosen), None)
    if runner_up is not None:
        reason += f"; next within the budget: {runner_up}, {scores[runner_up] / scores[chosen]:.2f}x its latency"
    if over:
        reason += f"; over the budget: {over_text}"
    return Selection(chosen, reason, losses, scores, fits)


def export_onnx(model: TorchClassifier, path: str | Path, *, opset: int) -> str:
    """Export a loaded torch classifier to ONNX with dynamic batch and sequence axes.

    Inputs are the tokenizer outputs the model's ``forward`` accepts (``input_ids``,
    ``attention_mask`` and, where produced, ``token_type_ids``); the output is ``logits``. Attention
    is exported in its eager form where the model offers one (the graph pattern ONNX Runtime's
    transformer optimizer fuses); the model's own setting is restored afterwards. The legacy
    TorchScript exporter is tried first (fast, offline, robust for encoder classifiers), then the
    ``torch.export`` (dynamo) exporter. Each result must pass ``onnx.checker`` and reproduce the torch
    logits on a batch of a different shape than the export batch.

    Returns:
        the exporter that succeeded: ``"torchscript"`` or ``"dynamo"``.

    Raises:
        CompressionError: no exporter produced a valid, faithful graph; names the model type.
    """
    path = Path(path)
    names = _input_names(model)
    sample = model.tokenizer(EXPORT_SAMPLE_TEXTS, padding=True, truncation=True, max_length=model.max_length,
                             return_tensors="pt")
    args = tuple(sample[name] for name in names)
    failures = []
    with _eager_attention(model.model):
        wrapper = _LogitsOnly(model.model, names).eval()
        for exporter in ("torchscript", "dynamo"):
            try:
                _torch_export(wrapper, args, names, path, opset=opset, dynamo=exporter == "dynamo")
                _check_graph(path)
                _check_parity(model, path, names)
                return exporter
            except Exception as error:  # every exporter failure is reported together below
                failures.append(f"{exporter} exporter: {type(error).__name__}: {_first_line(error)}")
                path.unlink(missing_ok=True)
    model_type = _model_type(model)
    raise CompressionError(
        f"cannot export model type {model_type!r} ({type(model.model).__name__}) to ONNX: " + "; ".join(failures),
        stage=STAGE,
        path=str(model.directory),
        field="model_type",
    )


def fuse_transformer_graph(fp32_path: str | Path, fused_path: str | Path, model_config: Any) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (model type ``bert``) on the fp32 export.

    ``num_heads`` and ``hidden_size`` come from the Hugging Face config (0 lets the optimizer detect
    them). The embedding fusion stays off so the embedding table remains a quantizable ``Gather``.

    Returns:
        the recipe, with the count of each fused operator.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    heads = int(getattr(model_config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=heads, hidden_size=hidden,
                                   optimization_options=options, opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(fused_path))
    fused = {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
    return {"method": "onnxruntime.transformers.optimizer", "model_type": "bert", "num_heads": heads,
            "hidden_size": hidden, "fused_operators": fused}


def quantize_int8(fp32_path: str | Path, int8_path: str | Path) -> dict[str, Any]:
    """Dynamic int8 quantization with ONNX Runtime: int8 weights (per channel) for MatMul and Gather.

    Returns:
        the recipe.

    Raises:
        CompressionError: the quantizer failed or wrote an invalid graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_quantizer():
            quantize_dynamic(
                Path(fp32_path),
                Path(int8_path),
                op_types_to_quantize=QUANTIZED_OP_TYPES,
                per_channel=PER_CHANNEL,
                reduce_range=False,
                weight_type=QuantType.QInt8,
            )
        _check_graph(Path(int8_path))
    except Exception as error:  # the quantizer raises many types
        raise CompressionError(
            f"int8 dynamic quantization of {fp32_path} failed: {_first_line(error)}; leave onnx_int8_dynamic out of "
            f"compression.variants to skip it",
            stage=STAGE,
            path=str(fp32_path),
            field="compression.variants",
        ) from error
    return {"method": "int8_dynamic", "weight_type": "QInt8", "per_channel": PER_CHANNEL,
            "op_types": QUANTIZED_OP_TYPES}


def quantize_int8_static(
    fp32_path: str | Path,
    int8_path: str | Path,
    *,
    tokenizer: Any,
    texts: Sequence[str],
    input_names: Sequence[str],
    max_length: int,
) -> dict[str, Any]:
    """Static int8 (QDQ) with ONNX Runtime, calibrated on tokenised texts.

    uint8 activations and per-channel int8 weights for the weight MatMuls and Gather; activation
    ranges by MinMax over one calibration run per text (no padding in the ranges).

    Returns:
        the recipe, with the number of calibration rows.

    Raises:
        CompressionError: no calibration texts, or the quantizer failed or wrote an invalid graph.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not texts:
        raise CompressionError("static int8 needs calibration texts; the validation split gave none",
                               stage=STAGE, field="compression.calibration_rows")
    reader = _calibration_reader(tokenizer, texts, input_names, max_length)
    try:
        with _quiet_quantizer():
            quantize_static(
                Path(fp32_path),
                Path(int8_path),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QUANTIZED_OP_TYPES,
                per_channel=PER_CHANNEL,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, STATIC_CALIBRATION_METHOD),
                extra_options={"MatMulConstBOnly": True, "CalibMaxIntermediateOutputs": CALIBRATION_FLUSH},
            )
        _check_graph(Path(int8_path))
    except Exception as error:  # the quantizer raises many types
        raise CompressionError(
            f"int8 static quantization of {fp32_path} failed: {_first_line(error)}; leave onnx_int8_static out of "
            f"compression.variants to skip it",
            stage=STAGE,
            path=str(fp32_path),
            field="compression.variants",
        ) from error
    return {"method": "int8_static", "format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
            "per_channel": PER_CHANNEL, "op_types": QUANTIZED_OP_TYPES, "matmul_const_b_only": True,
            "calibration_method": STATIC_CALIBRATION_METHOD, "calibration_rows": len(texts)}


def score_variant(name: str, predictions: Sequence[str], truth: Sequence[str], reference: Sequence[str],
                  labels: list[str]) -> dict[str, Any]:
    """Validation macro-F1 of a variant's predictions and their argmax agreement with torch fp32."""
    score = macro_f1(truth, predictions, labels)
    agreement = float(np.mean([a == b for a, b in zip(predictions, reference)])) if len(reference) else 1.0
    _log(f"{name}: validation macro-F1 {score:.4f}, agreement with torch fp32 {agreement:.4f}")
    return {"macro_f1": score, "agreement_with_fp32": agreement}


def measure_latencies(
    classifiers: Mapping[str, BaseClassifier], texts: Sequence[str], batch_sizes: Sequence[int], repeats: int
) -> dict[str, dict[int, float]]:
    """Median milliseconds of one ``predict_proba`` call (tokenisation included), per classifier and
    batch size, on the same fixed texts.

    For each batch size the texts are cut into full batches (repeated cyclically when there are
    fewer texts than one batch). After warm-up runs, ``repeats`` rounds time every batch once per
    classifier, the classifiers interleaved within a round so that load from other processes falls
    on all of them alike.
    """
    if not texts:
        raise ValueError("latency needs at least one text")
    batches = {}
    for size in batch_sizes:
        if len(texts) >= size:
            batches[size] = [list(texts[i : i + size]) for i in range(0, len(texts) - size + 1, size)]
        else:
            batches[size] = [[texts[i % len(texts)] for i in range(size)]]
    for classifier in classifiers.values():
        for size in batch_sizes:
            for _ in range(WARMUP_RUNS):
                classifier.predict_proba(batches[size][0], batch_size=size)
    timings: dict[str, dict[int, list[float]]] = {name: {size: [] for size in batch_sizes} for name in classifiers}
    for _ in range(repeats):
        for size in batch_sizes:
            for name, classifier in classifiers.items():
                for batch in batches[size]:
                    started = time.perf_counter()
                    classifier.predict_proba(batch, batch_size=size)
                    timings[name][size].append((time.perf_counter() - started) * 1000.0)
    return {name: {size: round(float(statistics.median(values)), 3) for size, values in by_size.items()}
            for name, by_size in timings.items()}


def measure_latency(classifier: BaseClassifier, texts: Sequence[str], batch_size: int, repeats: int) -> float:
    """Median milliseconds of one ``predict_proba`` call on batches of ``batch_size`` of ``texts``."""
    return measure_latencies({"classifier": classifier}, texts, [batch_size], repeats)["classifier"][batch_size]


def checkpoint_size(model_dir: str | Path) -> int:
    """Bytes of the weights in a Hugging Face checkpoint directory (safetensors, else .bin)."""
    directory = Path(model_dir)
    weights = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(_size(path) for path in weights)


@contextlib.contextmanager
def _quiet_quantizer():
    """Drop the quantizer's advice to run its pre-processing (the root logger's one repeated warning)."""

    def advice(record: logging.LogRecord) -> bool:
        return "consider" not in record.getMessage() or "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


class _eager_attention:
    """Switch a Hugging Face model to eager attention for the export, and back afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.previous = getattr(getattr(model, "config", None), "_attn_implementation", None)

    def __enter__(self) -> None:
        if self.previous not in (None, "eager") and hasattr(self.model, "set_attn_implementation"):
            try:
                self.model.set_attn_implementation("eager")
            except (ValueError, ImportError, AttributeError):  # the model has no eager attention
                self.previous = None

    def __exit__(self, *exc_info: Any) -> None:
        if self.previous not in (None, "eager"):
            self.model.set_attn_implementation(self.previous)


def _calibration_reader(tokenizer: Any, texts: Sequence[str], input_names: Sequence[str], max_length: int):
    """A ``CalibrationDataReader`` yielding one tokenised text per run, in the graph's input names."""
    from onnxruntime.quantization import CalibrationDataReader

    class TextCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = []
            for text in texts:
                encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="np")
                feed = {}
                for name in input_names:
                    if name in encoded:
                        feed[name] = np.asarray(encoded[name], dtype=np.int64)
                    else:
                        feed[name] = np.zeros_like(np.asarray(encoded["input_ids"], dtype=np.int64))
                self.feeds.append(feed)
            self.rewind()

        def get_next(self):
            return next(self.iterator, None)

        def rewind(self) -> None:
            self.iterator = iter(self.feeds)

        def __len__(self) -> int:
            return len(self.feeds)

    return TextCalibrationReader()


class _LogitsOnly(torch.nn.Module):
    """Positional tokenizer tensors in, logits out: the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def _torch_export(wrapper, args: tuple, names: list[str], path: Path, *, opset: int, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                wrapper, args, str(path), input_names=names, output_names=["logits"], opset_version=opset,
                dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # one entry: *tensors
            )
        else:
            torch.onnx.export(
                wrapper, args, str(path), input_names=names, output_names=["logits"], opset_version=opset,
                dynamo=False, do_constant_folding=True,
                dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names}, "logits": {0: "batch"}},
            )
    if not path.is_file():
        raise RuntimeError(f"the exporter wrote no {path.name}")


def _check_graph(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))


def _check_parity(model: TorchClassifier, path: Path, names: list[str]) -> None:
    """The exported graph must reproduce torch's logits on a batch shaped unlike the export batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    encoded = model.tokenizer(PARITY_SAMPLE_TEXTS, padding=True, truncation=True, max_length=model.max_length,
                              return_tensors="np")
    onnx_logits = session.run(None, {name: np.asarray(encoded[name], dtype=np.int64) for name in names})[0]
    torch_logits = model._logits(PARITY_SAMPLE_TEXTS)
    if onnx_logits.shape != torch_logits.shape or not np.allclose(
        onnx_logits, torch_logits, atol=PARITY_ATOL, rtol=PARITY_RTOL
    ):
        difference = np.abs(onnx_logits - torch_logits).max() if onnx_logits.shape == torch_logits.shape else "shape"
        raise RuntimeError(f"ONNX logits differ from torch (max difference {difference})")


def _input_names(model: TorchClassifier) -> list[str]:
    produced = set(model.tokenizer(EXPORT_SAMPLE_TEXTS[:1]).keys())
    accepted = set(inspect.signature(model.model.forward).parameters)
    names = [name for name in MODEL_INPUTS if name in produced and name in accepted]
    if "input_ids" not in names:
        raise CompressionError(
            f"model type {_model_type(model)!r} does not take input_ids from its tokenizer; cannot export it",
            stage=STAGE, path=str(model.directory), field="model_type",
        )
    return names


def _model_type(model: TorchClassifier) -> str:
    return str(getattr(model.model.config, "model_type", None) or type(model.model).__name__)


def _summary(chosen, kept, reason, variants, batch_sizes, rows, exporter, skipped) -> CompressionSummary:
    torch_variant, kept_variant = variants[TORCH_FP32], variants[chosen]
    speedup = {
        batch: round(torch_variant["latency_ms"][batch] / kept_variant["latency_ms"][batch], 3)
        if kept_variant["latency_ms"][batch] > 0 else math.inf
        for batch in batch_sizes
    }
    size_ratio = (round(kept_variant["size_bytes"] / torch_variant["size_bytes"], 4)
                  if torch_variant["size_bytes"] else math.nan)
    recorded = {
        name: {
            "latency_ms": {str(batch): ms for batch, ms in variant["latency_ms"].items()},
            "size_bytes": int(variant["size_bytes"]),
            "macro_f1": variant["macro_f1"],
            "agreement_with_fp32": variant["agreement_with_fp32"],
        }
        for name, variant in variants.items()
    }
    return CompressionSummary(
        chosen=chosen,
        precision=kept.precision,
        reason=reason,
        validation_rows=rows,
        macro_f1={name: v["macro_f1"] for name, v in variants.items()},
        agreement_with_fp32={name: v["agreement_with_fp32"] for name, v in variants.items()},
        size_bytes={name: int(v["size_bytes"]) for name, v in variants.items()},
        latency_ms={name: dict(v["latency_ms"]) for name, v in variants.items()},
        macro_f1_change_points=round(100.0 * (kept_variant["macro_f1"] - torch_variant["macro_f1"]), 4) + 0.0,
        latency_speedup=speedup,
        size_ratio=size_ratio,
        exporter=exporter,
        variants=recorded,
        runtime=kept.runtime,
        skipped=dict(skipped),
    )


def _write_output(output_dir: Path, chosen_file: Path, target_name: str, *, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chosen_file, output_dir / target_name)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(output_dir)


def _source_metadata(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ModelError(f"model directory not found: {model_dir}", stage=STAGE, path=str(model_dir))
    metadata = read_metadata(model_dir)
    if metadata.get("kind") != "model":
        raise ModelError(
            f"{model_dir} is not a Model directory (tuneloop.json kind {metadata.get('kind')!r}, expected 'model')",
            stage=STAGE, path=str(model_dir), field="kind",
        )
    if not metadata.get("labels"):
        raise ModelError(f"{model_dir}/tuneloop.json names no labels", stage=STAGE, path=str(model_dir), field="labels")
    return metadata


def _validation_rows(dataset_path, text_column: str, label_column: str, labels: list[str]):
    frame = load_split(dataset_path, "validation")
    missing = [column for column in (text_column, label_column) if column not in frame.columns]
    if missing:
        raise DataError(
            f"dataset artifact {dataset_path} has no column {', '.join(map(repr, missing))}",
            stage=STAGE, path=str(dataset_path), field=missing[0],
        )
    texts = frame[text_column].fillna("").astype(str).tolist()
    truth = frame[label_column].astype(str).tolist()
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        raise DataError(
            f"validation split holds labels the model does not know {unknown[:5]} (model labels {labels})",
            stage=STAGE, path=str(dataset_path), field=label_column,
        )
    return texts, truth


def _loss_points(reference_f1: float, other_f1: float) -> float:
    """Macro-F1 lost, in points, rounded so float noise cannot break a budget of 0."""
    return round(100.0 * (reference_f1 - other_f1), 6)


def _size(path: Path) -> int:
    return Path(path).stat().st_size


def _first_line(error: BaseException) -> str:
    """The line of an error message that says what went wrong (the exporter's own summary line
    when it wrote one), without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), lines[0])
    return summary[:400]



def _relative_latency(variant: Mapping[str, Any], baseline: Mapping[str, Any], batch_sizes: Sequence[int]) -> float:
    """Geometric mean over the batch sizes of the variant's latency divided by the baseline's."""
    logs = [math.log(max(_ms(variant, b), 1e-9) / max(_ms(baseline, b), 1e-9)) for b in batch_sizes]
    return round(math.exp(sum(logs) / len(logs)), 4)


def _ms(variant: Mapping[str, Any], batch: int) -> float:
    latency = variant["latency_ms"]
    return float(latency[batch] if batch in latency else latency[str(batch)])


def _speedup(reference: Mapping[str, Any], variant: Mapping[str, Any], batch: int) -> str:
    """``N.Nx``: how many times faster than the reference at one batch size."""
    return f"{_ms(reference, batch) / max(_ms(variant, batch), 1e-9):.1f}x"


def _log(message: str) -> None:
    print(f"compress: {message}", flush=True)
