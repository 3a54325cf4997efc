"""Compression: ONNX export, ONNX Runtime int8 dynamic quantization, measurement and choice.

The fine-tuned checkpoint is exported to ONNX (dynamic batch and sequence axes), checked with
``onnx.checker`` and against the torch logits, then quantized to int8 (dynamic: int8 weights,
activations quantized at run time). Torch fp32, ONNX fp32 and ONNX int8 are scored on the
validation split (macro-F1, argmax agreement with torch) and timed at each configured batch size.
int8 is kept only when its macro-F1 loss against torch fp32 stays within
``compression.max_f1_loss_points``; otherwise ONNX fp32 is kept and the reason recorded. The choice,
with every measured number, lands in the Compressed Model's ``tuneloop.json``.
"""

from __future__ import annotations

import inspect
import math
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.config import TuneloopConfig
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, DataError, ModelError
from tuneloop.metrics import macro_f1
from tuneloop.runtime import MODEL_INPUTS, ONNX_FILE, BaseClassifier, OnnxClassifier, TorchClassifier

STAGE = "compression"
TORCH_FP32, ONNX_FP32, ONNX_INT8 = "torch_fp32", "onnx_fp32", "onnx_int8"
FP32_FILE, INT8_FILE = "model_fp32.onnx", "model_int8.onnx"
QUANTIZED_OP_TYPES = ["MatMul", "Gather"]
"""int8 weights for the dense layers (MatMul) and the embedding tables (Gather). Measured on MiniLM-L6
fine-tuned on SMS spam: per-channel MatMul weights cost 0.25 macro-F1 points where per-tensor cost 1.5;
adding Gather (embeddings) shrinks the file from 59 MB to 23 MB at no further loss."""
PER_CHANNEL = True
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
class CompressionSummary:
    """What compression measured and kept. Variant names: ``torch_fp32``, ``onnx_fp32``, ``onnx_int8``."""

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

    def to_metrics(self) -> dict[str, float]:
        """Flat numbers for a KFP ``Metrics`` artifact."""
        metrics: dict[str, float] = {
            "int8_chosen": 1.0 if self.chosen == ONNX_INT8 else 0.0,
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
    """Export, quantize, measure and write the Compressed Model directory.

    Args:
        config: the project config; ``compression`` holds the settings.
        model_dir: the Model directory (Hugging Face checkpoint + ``tuneloop.json``).
        dataset_path: the Dataset artifact; its validation split is scored and timed.
        output_dir: where the Compressed Model directory is written (``model.onnx``, tokenizer,
            ``tuneloop.json``).

    Raises:
        ModelError: the Model directory or its metadata is missing or unusable.
        DataError: the dataset lacks a validation split or the text/label columns.
        CompressionError: the export (naming the model type) or the quantization failed.
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

    with tempfile.TemporaryDirectory(prefix="tuneloop-compress-") as scratch:
        work = Path(scratch)
        torch_model = TorchClassifier(model_dir, labels=labels, max_length=max_length)
        torch_model.tokenizer.save_pretrained(work)
        print(f"compress: exporting {_model_type(torch_model)} to ONNX (opset {settings.opset})", flush=True)
        exporter = export_onnx(torch_model, work / FP32_FILE, opset=settings.opset)
        print(f"compress: exported {FP32_FILE} with the {exporter} exporter "
              f"({_size(work / FP32_FILE) / 1e6:.1f} MB)", flush=True)
        files = {ONNX_FP32: work / FP32_FILE}
        if settings.quantize == "int8_dynamic":
            print(f"compress: quantizing to int8 (dynamic, {'per-channel' if PER_CHANNEL else 'per-tensor'} "
                  f"{'/'.join(QUANTIZED_OP_TYPES)} weights)", flush=True)
            quantize_int8(work / FP32_FILE, work / INT8_FILE)
            files[ONNX_INT8] = work / INT8_FILE
            print(f"compress: quantized {INT8_FILE} ({_size(work / INT8_FILE) / 1e6:.1f} MB)", flush=True)

        print(f"compress: measuring on {len(texts)} validation rows, batch sizes {batch_sizes}, "
              f"median of {settings.latency_repeats} runs", flush=True)
        reference = torch_model.predict(texts, batch_size=SCORING_BATCH_SIZE)
        variants = {TORCH_FP32: _measure(TORCH_FP32, torch_model, texts, truth, reference, labels,
                                         batch_sizes, settings.latency_repeats)}
        variants[TORCH_FP32]["size_bytes"] = checkpoint_size(model_dir)
        del torch_model
        for name, path in files.items():
            classifier = OnnxClassifier(work, model_file=path.name, labels=labels, max_length=max_length)
            variants[name] = _measure(name, classifier, texts, truth, reference, labels, batch_sizes,
                                      settings.latency_repeats)
            variants[name]["size_bytes"] = _size(path)
            del classifier

        reference_f1 = variants[TORCH_FP32]["macro_f1"]
        int8_f1 = variants[ONNX_INT8]["macro_f1"] if ONNX_INT8 in variants else None
        chosen, reason = choose_variant(reference_f1, int8_f1, settings.max_f1_loss_points)
        fp32_loss = _loss_points(reference_f1, variants[ONNX_FP32]["macro_f1"])
        if chosen == ONNX_FP32 and fp32_loss > settings.max_f1_loss_points:
            reason += (f"; ONNX fp32 itself loses {fp32_loss:.2f} points (over the budget of "
                       f"{settings.max_f1_loss_points:g}), left to the evaluation gate")
        print(f"compress: kept {chosen}: {reason}", flush=True)
        _write_output(output_dir, files[chosen], tokenizer_dir=work)

    summary = _summary(chosen, reason, variants, batch_sizes, len(texts), exporter)
    metadata = {
        "kind": "compressed_model",
        "runtime": "onnxruntime",
        "precision": summary.precision,
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
        "chosen": chosen,
        "reason": reason,
        "validation_rows": len(texts),
        "export": {"exporter": exporter, "opset": settings.opset},
        "quantization": {
            "method": settings.quantize,
            "weight_type": "QInt8",
            "per_channel": PER_CHANNEL,
            "op_types": QUANTIZED_OP_TYPES,
            "max_f1_loss_points": settings.max_f1_loss_points,
        } if settings.quantize == "int8_dynamic" else {"method": "none"},
    }
    write_metadata(output_dir, metadata)
    print(f"compress: wrote {output_dir} ({summary.precision}, {summary.size_ratio:.2f}x the checkpoint size, "
          f"macro-F1 change {summary.macro_f1_change_points:+.2f} points)", flush=True)
    return summary


def choose_variant(reference_f1: float, int8_f1: float | None, max_loss_points: float) -> tuple[str, str]:
    """Keep int8 when its macro-F1 loss against torch fp32 is within the budget, else ONNX fp32.

    Args:
        reference_f1: torch fp32 validation macro-F1 (a share in [0, 1]).
        int8_f1: ONNX int8 validation macro-F1, or ``None`` when quantization is off.
        max_loss_points: the budget, in points (100 x the F1 difference).

    Returns:
        ``(chosen variant name, reason)``.
    """
    if int8_f1 is None:
        return ONNX_FP32, "quantization is off (compression.quantize: none); kept ONNX fp32"
    loss = _loss_points(reference_f1, int8_f1)
    if loss <= max_loss_points:
        return ONNX_INT8, (
            f"int8 changes validation macro-F1 by {0.0 - loss:+.2f} points against torch fp32, within the budget of "
            f"{max_loss_points:g} points (compression.max_f1_loss_points)"
        )
    return ONNX_FP32, (
        f"int8 would lose {loss:.2f} validation macro-F1 points against torch fp32, over the budget of "
        f"{max_loss_points:g} points (compression.max_f1_loss_points); kept ONNX fp32"
    )


def export_onnx(model: TorchClassifier, path: str | Path, *, opset: int) -> str:
    """Export a loaded torch classifier to ONNX with dynamic batch and sequence axes.

    Inputs are the tokenizer outputs the model's ``forward`` accepts (``input_ids``,
    ``attention_mask`` and, where produced, ``token_type_ids``); the output is ``logits``. The legacy
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
    wrapper = _LogitsOnly(model.model, names).eval()
    sample = model.tokenizer(EXPORT_SAMPLE_TEXTS, padding=True, truncation=True, max_length=model.max_length,
                             return_tensors="pt")
    args = tuple(sample[name] for name in names)
    failures = []
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


def quantize_int8(fp32_path: str | Path, int8_path: str | Path) -> None:
    """Dynamic int8 quantization with ONNX Runtime: int8 weights (per channel) for MatMul and Gather.

    Raises:
        CompressionError: the quantizer failed or wrote an invalid graph.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
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
            f"int8 dynamic quantization of {fp32_path} failed: {_first_line(error)}; set compression.quantize: none "
            f"to keep ONNX fp32",
            stage=STAGE,
            path=str(fp32_path),
            field="compression.quantize",
        ) from error


def measure_latency(classifier: BaseClassifier, texts: Sequence[str], batch_size: int, repeats: int) -> float:
    """Median milliseconds of one ``predict_proba`` call (tokenisation included) on a batch of
    ``batch_size`` validation texts (repeated when there are fewer), after warm-up runs."""
    batch = [texts[i % len(texts)] for i in range(batch_size)]
    for _ in range(WARMUP_RUNS):
        classifier.predict_proba(batch, batch_size=batch_size)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        classifier.predict_proba(batch, batch_size=batch_size)
        timings.append((time.perf_counter() - started) * 1000.0)
    return float(statistics.median(timings))


def checkpoint_size(model_dir: str | Path) -> int:
    """Bytes of the weights in a Hugging Face checkpoint directory (safetensors, else .bin)."""
    directory = Path(model_dir)
    weights = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(_size(path) for path in weights)


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


def _measure(name, classifier, texts, truth, reference, labels, batch_sizes, repeats) -> dict[str, Any]:
    predictions = reference if name == TORCH_FP32 else classifier.predict(texts, batch_size=SCORING_BATCH_SIZE)
    score = macro_f1(truth, predictions, labels)
    agreement = float(np.mean([a == b for a, b in zip(predictions, reference)]))
    print(f"compress: {name} validation macro-F1 {score:.4f}, agreement with torch fp32 {agreement:.4f}", flush=True)
    latency = {}
    for batch in batch_sizes:
        latency[batch] = round(measure_latency(classifier, texts, batch, repeats), 3)
        print(f"compress: {name} latency at batch {batch}: {latency[batch]:.2f} ms", flush=True)
    return {"macro_f1": score, "agreement_with_fp32": agreement, "latency_ms": latency}


def _summary(chosen, reason, variants, batch_sizes, rows, exporter) -> CompressionSummary:
    torch_variant, kept = variants[TORCH_FP32], variants[chosen]
    speedup = {
        batch: round(torch_variant["latency_ms"][batch] / kept["latency_ms"][batch], 3)
        if kept["latency_ms"][batch] > 0 else math.inf
        for batch in batch_sizes
    }
    size_ratio = round(kept["size_bytes"] / torch_variant["size_bytes"], 4) if torch_variant["size_bytes"] else math.nan
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
        precision="int8" if chosen == ONNX_INT8 else "fp32",
        reason=reason,
        validation_rows=rows,
        macro_f1={name: v["macro_f1"] for name, v in variants.items()},
        agreement_with_fp32={name: v["agreement_with_fp32"] for name, v in variants.items()},
        size_bytes={name: int(v["size_bytes"]) for name, v in variants.items()},
        latency_ms={name: dict(v["latency_ms"]) for name, v in variants.items()},
        macro_f1_change_points=round(100.0 * (kept["macro_f1"] - torch_variant["macro_f1"]), 4) + 0.0,  # no -0.0
        latency_speedup=speedup,
        size_ratio=size_ratio,
        exporter=exporter,
        variants=recorded,
    )


def _write_output(output_dir: Path, chosen_file: Path, *, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chosen_file, output_dir / ONNX_FILE)
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

