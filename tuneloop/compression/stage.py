"""The compress step: build the candidates, measure them side by side, keep the fastest within budget.

See the package docstring (:mod:`tuneloop.compression`) for what each candidate is and the rule.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tuneloop import tensorrt_engine
from tuneloop.artifacts import read_metadata, write_metadata
from tuneloop.privacy import TEXT_PRIVACY_KEY
from tuneloop.compression import build, distillation, measure, pruning
from tuneloop.compression.choose import SELECTION_RULE, choose_variant, eligible_variants
from tuneloop.compression.common import STAGE, file_size, log
from tuneloop.compression.export import export_onnx, model_type
from tuneloop.compression.quantize import calibration_sample
from tuneloop.compression.variants import (
    DISTILLED,
    ONNX_INT8_STATIC,
    PRUNED,
    TEACHER,
    TENSORRT_INT8,
    TENSORRT_VARIANTS,
    TORCH_FP32,
    Candidate,
    fp32_variant,
    spec,
    student_sources,
)
from tuneloop.config import TuneloopConfig
from tuneloop.datasets import load_split
from tuneloop.errors import CompressionError, DataError, ModelError
from tuneloop.runtime import ONNX_FILE, BaseClassifier, TorchClassifier, default_threads


@dataclass
class CompressionSummary:
    """What compression measured and kept. Variant names: ``torch_fp32`` (the teacher, the reference)
    and the candidates (``onnx_fp32`` ... ``tensorrt_int8``, ``distilled_*``, ``pruned_*``)."""

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
    build_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"

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
        for name, seconds in self.build_seconds.items():
            metrics[f"build_seconds_{name}"] = float(seconds)
        for batch, speedup in self.latency_speedup.items():
            metrics[f"latency_speedup_batch{batch}"] = float(speedup)
        return metrics


@dataclass
class CompressionInputs:
    """The rows compression works on: validation rows score, time, calibrate and rank pruning
    importance; train rows (and optional unlabelled texts) train the students."""

    labels: list[str]
    max_length: int
    text_column: str
    label_column: str
    texts: list[str]
    truth: list[str]
    train_texts: list[str] = field(default_factory=list)
    train_truth: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)


def run(
    config: TuneloopConfig, model_dir: str | Path, dataset_path: str | Path, output_dir: str | Path
) -> CompressionSummary:
    """Export, build the candidate variants, measure them all, and write the Compressed Model directory.

    Args:
        config: the project config; ``compression`` holds the settings (``variants``,
            ``max_f1_loss_points``, ``calibration_rows``, latency settings, ``distillation``,
            ``pruning``); ``deployment.device`` says where the kept model will serve.
        model_dir: the Model directory (Hugging Face checkpoint + ``tuneloop.json``): the teacher.
        dataset_path: the Dataset artifact; its validation split is scored, timed (a fixed sample),
            calibrates static int8 and scores pruning importance; its train split trains the students.
        output_dir: where the Compressed Model directory is written (``model.onnx`` or
            ``model.plan``, tokenizer, ``tuneloop.json``).

    Raises:
        ConfigError: no listed variant runs on ``deployment.device``.
        ModelError: the Model directory or its metadata is missing or unusable.
        DataError: the dataset lacks a split or column, or holds too few train rows to distil.
        CompressionError: the ONNX export failed (naming the model type); the teacher's architecture
            cannot be distilled or pruned (named); ``deployment.device`` is cuda but this step cannot
            build TensorRT engines.
    """
    settings, device = config.compression, config.deployment.device
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    names = settings.candidates()
    eligible = eligible_variants(names, device)
    if device == "cuda" and tensorrt_engine.unavailable_reason():
        raise CompressionError(
            f"deployment.device is cuda but this compress step cannot build TensorRT engines "
            f"({tensorrt_engine.unavailable_reason()}): run compress on a GPU node or serve on cpu",
            stage=STAGE, field="deployment.device",
        )
    source = _source_metadata(model_dir)
    students = student_sources(names)
    inputs = _read_inputs(config, source, dataset_path, students)
    batch_sizes = sorted(set(settings.latency_batch_sizes))
    calibrated = [name for name in names if spec(name).recipe in (ONNX_INT8_STATIC, TENSORRT_INT8)]
    calibration_texts, calibration = calibration_sample(inputs.texts, settings.calibration_rows, log=bool(calibrated))

    with tempfile.TemporaryDirectory(prefix="tuneloop-compress-") as scratch:
        work = Path(scratch)
        teacher = TorchClassifier(model_dir, labels=inputs.labels, max_length=inputs.max_length)
        teacher.tokenizer.save_pretrained(work)
        candidates, skipped, exporter, student_recipes = build_all(config, teacher, work, calibration_texts, inputs)
        variants = _measure_all(teacher, model_dir, candidates, work, inputs, batch_sizes, settings)

        built_eligible = [name for name in eligible if name in candidates]
        selection = choose_variant(variants, max_loss_points=settings.max_f1_loss_points, batch_sizes=batch_sizes,
                                   eligible=built_eligible, device=device)
        reason = selection.reason
        if settings.quantize == "none":
            reason = f"quantization is off (compression.quantize: none); {reason}"
        kept = candidates[selection.chosen]
        log(f"kept {selection.chosen}: {reason}")
        target = tensorrt_engine.PLAN_FILE if kept.runtime == "tensorrt" else ONNX_FILE
        _write_output(output_dir, work / kept.file, target, tokenizer_dir=work)

    summary = _summary(selection.chosen, kept, reason, variants, batch_sizes, len(inputs.texts), exporter, skipped,
                       candidates, eligible, device)
    metadata = {
        "kind": "compressed_model",
        "runtime": kept.runtime,
        "precision": kept.precision,
        "source": kept.source,
        "device": device,
        "labels": inputs.labels,
        "max_length": inputs.max_length,
        "base_model": source.get("base_model", ""),
        "data_fingerprint": source.get("data_fingerprint", ""),
        "text_column": inputs.text_column,
        "label_column": inputs.label_column,
        "source_metrics": source.get("metrics", {}),
        "privacy": source.get("privacy", {"dp": False}),  # DP-SGD's spent epsilon, for the registry and the gate
        TEXT_PRIVACY_KEY: source.get(TEXT_PRIVACY_KEY),  # serving masks requests as training masked texts
        "variants": summary.variants,
        "macro_f1_change_points": summary.macro_f1_change_points,
        "latency_speedup": {str(batch): value for batch, value in summary.latency_speedup.items()},
        "size_ratio": summary.size_ratio,
        "chosen": selection.chosen,
        "reason": reason,
        "validation_rows": len(inputs.texts),
        "selection": {
            "rule": SELECTION_RULE,
            "device": device,
            "eligible": selection.eligible,
            "max_f1_loss_points": settings.max_f1_loss_points,
            "latency_batch_sizes": batch_sizes,
            "f1_loss_points": selection.f1_loss_points,
            "relative_latency": selection.relative_latency,
            "within_budget": selection.within_budget,
        },
        "measurement": {
            "scored_rows": len(inputs.texts),
            "latency_rows": min(settings.latency_rows, len(inputs.texts)),
            "latency_repeats": settings.latency_repeats,
            "scoring_batch_size": measure.SCORING_BATCH_SIZE,
            "threads": default_threads(),
            "device": "cpu (ONNX Runtime CPU execution provider; torch fp32 on CPU)"
            if kept.runtime != "tensorrt" else "cuda (TensorRT) and cpu (torch fp32, ONNX Runtime)",
        },
        "export": {"exporter": exporter, "opset": settings.opset},
        "recipes": {name: candidate.recipe for name, candidate in candidates.items()},
        "students": student_recipes,
        "quantization": {**kept.recipe, "max_f1_loss_points": settings.max_f1_loss_points}
        if kept.precision == "int8" else {"method": "none"},
        "calibration": calibration if calibrated else None,
        "skipped": skipped,
    }
    _record_tensorrt(metadata, candidates, kept, names, skipped)
    write_metadata(output_dir, metadata)
    log(f"wrote {output_dir} ({selection.chosen}, {summary.precision}, {summary.size_ratio:.2f}x the checkpoint "
        f"size, macro-F1 change {summary.macro_f1_change_points:+.2f} points)")
    return summary


def build_all(config: TuneloopConfig, teacher: TorchClassifier, work: Path, calibration_texts: Sequence[str],
              inputs: CompressionInputs):
    """Export the teacher and build its variants, then train, export and build each listed student's
    (``compression.variants``), for ``deployment.device``, in the scratch directory ``work``.

    Returns:
        ``(candidates by name, skipped name -> reason, the exporter used, student recipes by source)``.
    """
    settings, device = config.compression, config.deployment.device
    names = settings.candidates()
    students = student_sources(names)
    if DISTILLED in students:
        distillation.check_distillable(teacher.model, len(inputs.train_texts), settings.distillation)
    if PRUNED in students:
        distillation.encoder_layers(teacher.model)
    log(f"exporting {model_type(teacher)} to ONNX (opset {settings.opset})")
    started = time.perf_counter()
    fp32 = work / spec(fp32_variant(TEACHER)).file
    exporter = export_onnx(teacher, fp32, opset=settings.opset)
    export_seconds = time.perf_counter() - started
    log(f"exported {fp32.name} with the {exporter} exporter ({file_size(fp32) / 1e6:.1f} MB) in {export_seconds:.1f}s")
    candidates, skipped = build.build_candidates(teacher, work, names, calibration_texts, exporter=exporter,
                                                 device=device, base_seconds=export_seconds)
    student_recipes: dict[str, dict[str, Any]] = {}
    for source in students:
        started = time.perf_counter()
        model, recipe = _train_student(config, teacher, source, inputs)
        student = TorchClassifier.from_model(model, teacher.tokenizer, directory=teacher.directory,
                                             labels=inputs.labels, max_length=inputs.max_length)
        export_onnx(student, work / spec(fp32_variant(source)).file, opset=settings.opset)
        recipe["build_seconds"] = round(time.perf_counter() - started, 1)
        student_recipes[source] = recipe
        log(f"{source} student ready in {recipe['build_seconds']:.0f}s ({recipe['parameters']:,} parameters, "
            f"teacher {recipe['teacher_parameters']:,})")
        built, missed = build.build_candidates(
            student, work, names, calibration_texts, exporter=exporter, source=source, device=device,
            base_seconds=recipe["build_seconds"], fusion_config="model" if source == DISTILLED else None)
        for candidate in built.values():
            candidate.recipe = {**candidate.recipe, "student": source}
        candidates.update(built)
        skipped.update(missed)
    return candidates, skipped, exporter, student_recipes


def _train_student(config: TuneloopConfig, teacher: TorchClassifier, source: str, inputs: CompressionInputs):
    settings = config.compression
    if source == DISTILLED:
        return distillation.distil(teacher, inputs.train_texts, inputs.train_truth, settings.distillation,
                                   unlabelled_texts=inputs.unlabelled)
    if source == PRUNED:
        return pruning.prune(teacher, inputs.texts, inputs.truth, inputs.train_texts, inputs.train_truth,
                             settings.pruning)
    raise ValueError(f"unknown student source {source!r}")


def _measure_all(teacher: TorchClassifier, model_dir: Path, candidates: dict[str, Candidate], work: Path,
                 inputs: CompressionInputs, batch_sizes: Sequence[int], settings: Any) -> dict[str, dict[str, Any]]:
    """Score every candidate and the teacher on all validation rows, then time them interleaved."""
    texts = inputs.texts
    log(f"scoring {len(texts)} validation rows; timing the first {min(settings.latency_rows, len(texts))} at "
        f"batch sizes {list(batch_sizes)}, {settings.latency_repeats} interleaved rounds")
    reference = teacher.predict(texts, batch_size=measure.SCORING_BATCH_SIZE)
    classifiers: dict[str, BaseClassifier] = {TORCH_FP32: teacher}
    variants = {TORCH_FP32: measure.score_variant(TORCH_FP32, reference, inputs.truth, reference, inputs.labels)}
    variants[TORCH_FP32]["size_bytes"] = measure.checkpoint_size(model_dir)
    for name, candidate in candidates.items():
        classifiers[name] = build.load_candidate(candidate, work, labels=inputs.labels, max_length=inputs.max_length)
        predictions = classifiers[name].predict(texts, batch_size=measure.SCORING_BATCH_SIZE)
        variants[name] = measure.score_variant(name, predictions, inputs.truth, reference, inputs.labels)
        variants[name]["size_bytes"] = file_size(work / candidate.file)
    latencies = measure.measure_latencies(classifiers, texts[: settings.latency_rows], batch_sizes,
                                          settings.latency_repeats)
    for name, latency in latencies.items():
        variants[name]["latency_ms"] = latency
        log(f"{name}: " + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in latency.items())
            + f", {variants[name]['size_bytes'] / 1e6:.1f} MB")
    return variants


def _read_inputs(config: TuneloopConfig, source: dict[str, Any], dataset_path,
                 students: Sequence[str]) -> CompressionInputs:
    labels = [str(label) for label in source["labels"]]
    text_column = source.get("text_column") or config.data.text_column
    label_column = source.get("label_column") or config.data.label_column
    texts, truth = _split_rows(dataset_path, "validation", text_column, label_column, labels)
    inputs = CompressionInputs(labels, int(source.get("max_length") or config.training.max_length), text_column, label_column,
                     texts, truth)
    if students:
        inputs.train_texts, inputs.train_truth = _split_rows(dataset_path, "train", text_column, label_column, labels)
    distil = config.compression.distillation
    if DISTILLED in students and distil.unlabelled_texts:
        inputs.unlabelled = distillation.unlabelled_train_texts(config, distil.max_unlabelled_rows)
    return inputs


def _record_tensorrt(metadata: dict[str, Any], candidates: dict[str, Candidate], kept: Candidate,
                     names: Sequence[str], skipped: dict[str, str]) -> None:
    """TensorRT version and GPU where an engine was built, else why none was."""
    tensorrt = next((c.recipe for c in candidates.values() if c.runtime == "tensorrt"), None)
    if kept.runtime == "tensorrt":
        tensorrt = kept.recipe
    if tensorrt is not None:
        keys = ("version", "gpu", "compute_capability")
        metadata["tensorrt"] = {key: tensorrt[key] for key in keys if key in tensorrt}
    elif any(spec(name).recipe in TENSORRT_VARIANTS for name in names):
        metadata["tensorrt"] = {"skipped": next(skipped[n] for n in names
                                                if spec(n).recipe in TENSORRT_VARIANTS and n in skipped)}


def _summary(chosen, kept, reason, variants, batch_sizes, rows, exporter, skipped, candidates, eligible,
             device) -> CompressionSummary:
    torch_variant, kept_variant = variants[TORCH_FP32], variants[chosen]
    speedup = {
        batch: round(torch_variant["latency_ms"][batch] / kept_variant["latency_ms"][batch], 3)
        if kept_variant["latency_ms"][batch] > 0 else math.inf
        for batch in batch_sizes
    }
    size_ratio = (round(kept_variant["size_bytes"] / torch_variant["size_bytes"], 4)
                  if torch_variant["size_bytes"] else math.nan)
    build_seconds = {name: candidate.build_seconds for name, candidate in candidates.items()}
    recorded = {}
    for name, variant in variants.items():
        candidate = candidates.get(name)
        recorded[name] = {
            "latency_ms": {str(batch): ms for batch, ms in variant["latency_ms"].items()},
            "size_bytes": int(variant["size_bytes"]),
            "macro_f1": variant["macro_f1"],
            "agreement_with_fp32": variant["agreement_with_fp32"],
            "source": candidate.source if candidate else TEACHER,
            "runtime": candidate.runtime if candidate else "torch",
            "device": candidate.device if candidate else "cpu",
            "eligible": name in eligible,
            "build_seconds": candidate.build_seconds if candidate else 0.0,
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
        build_seconds=build_seconds,
        device=device,
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


def _split_rows(dataset_path, split: str, text_column: str, label_column: str, labels: list[str]):
    frame = load_split(dataset_path, split)
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
            f"{split} split holds labels the model does not know {unknown[:5]} (model labels {labels})",
            stage=STAGE, path=str(dataset_path), field=label_column,
        )
    return texts, truth


