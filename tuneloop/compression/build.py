"""Build the listed variants of one source model (the teacher or a student) from its fp32 ONNX export,
and load a built variant for measurement."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tuneloop import tensorrt_engine
from tuneloop.compression.common import file_size, first_line, log
from tuneloop.compression.export import input_names
from tuneloop.compression.quantize import (
    fuse_transformer_graph,
    quantize_int8,
    quantize_int8_int4_embeddings,
    quantize_int8_static,
)
from tuneloop.compression.variants import (
    ONNX_FP32_FUSED,
    ONNX_INT8_DYNAMIC,
    ONNX_INT8_EMB4,
    ONNX_INT8_STATIC,
    TEACHER,
    TENSORRT_FP16,
    TENSORRT_INT8,
    TENSORRT_VARIANTS,
    Candidate,
    fp32_variant,
    spec,
)
from tuneloop.runtime import BaseClassifier, OnnxClassifier, TorchClassifier


def build_candidates(
    torch_model: TorchClassifier,
    work: Path,
    names: Sequence[str],
    calibration_texts: Sequence[str],
    *,
    exporter: str = "",
    source: str = TEACHER,
    device: str = "cpu",
    base_seconds: float = 0.0,
    fusion_config: Any = "model",
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Build the requested variants of ``source`` next to its fp32 export in ``work``.

    The teacher's ONNX fp32 is always included (the fallback); a student's fp32 only when listed.
    Variants that do not run on ``device`` (``deployment.device``) are skipped with that reason and
    never built: a GPU compress step serving on CPU builds no TensorRT engine. TensorRT variants are
    skipped, with one logged reason, where no CUDA device or no TensorRT is present; any other
    variant that fails to build is skipped with its error.

    Args:
        base_seconds: what the source model cost before its recipes (student training and export),
            added to each variant's ``build_seconds``.
        fusion_config: the Hugging Face config that gives the fusion its head count and width
            (``"model"``: the model's own; ``None``: let the optimizer detect them, as for a pruned
            model whose layers keep different numbers of heads).

    Returns:
        ``(candidates by name, skipped variant -> reason)``.
    """
    base = fp32_variant(source)
    fp32 = work / spec(base).file
    wanted = [name for name in dict.fromkeys(names) if spec(name).source == source]
    candidates: dict[str, Candidate] = {}
    if source == TEACHER or base in wanted:
        candidates[base] = Candidate(base, fp32.name, "onnxruntime", "fp32", {"method": "export", "exporter": exporter},
                                     source=source, build_seconds=round(base_seconds, 1))
    skipped: dict[str, str] = {}
    for name in wanted:
        if spec(name).device != device and name not in candidates:
            skipped[name] = (f"runs on {spec(name).device} but deployment.device is {device}: it could not serve "
                             f"there, so it is not built")
    if skipped:
        log(f"skipped (deployment.device {device}): {', '.join(skipped)}")
    wanted_tensorrt = [name for name in wanted if spec(name).recipe in TENSORRT_VARIANTS and name not in skipped]
    if wanted_tensorrt:
        why = tensorrt_engine.unavailable_reason()
        if why:
            log(f"TensorRT variants skipped: {why}")
            skipped.update({name: why for name in wanted_tensorrt})
    builders = _builders(torch_model, fp32, calibration_texts,
                         torch_model.model.config if fusion_config == "model" else fusion_config)
    for name in wanted:
        if name in candidates or name in skipped:
            continue
        variant = spec(name)
        path = work / variant.file
        started = time.perf_counter()
        try:
            recipe = builders[variant.recipe](path) or {}
        except Exception as error:  # an optional candidate failing to build must not fail the stage
            skipped[name] = f"could not build it: {type(error).__name__}: {first_line(error)}"
            log(f"{name} skipped: {skipped[name]}")
            path.unlink(missing_ok=True)
            continue
        seconds = time.perf_counter() - started
        candidates[name] = Candidate(name, path.name, variant.runtime, variant.precision, recipe, source=source,
                                     build_seconds=round(base_seconds + seconds, 1))
        log(f"built {name} ({file_size(path) / 1e6:.1f} MB) in {seconds:.1f}s")
    return candidates, skipped


def _builders(torch_model: TorchClassifier, fp32: Path, calibration_texts: Sequence[str],
              fusion_config: Any) -> dict[str, Callable[[Path], dict[str, Any]]]:
    """Recipe name -> a function that writes the recipe's file from ``fp32`` and returns its record."""
    names = input_names(torch_model)
    tokenizer, max_length = torch_model.tokenizer, torch_model.max_length
    return {
        ONNX_FP32_FUSED: lambda out: fuse_transformer_graph(fp32, out, fusion_config),
        ONNX_INT8_DYNAMIC: lambda out: quantize_int8(fp32, out),
        ONNX_INT8_EMB4: lambda out: quantize_int8_int4_embeddings(fp32, out),
        ONNX_INT8_STATIC: lambda out: quantize_int8_static(
            fp32, out, tokenizer=tokenizer, texts=calibration_texts, input_names=names, max_length=max_length),
        TENSORRT_FP16: lambda out: tensorrt_engine.build_engine(
            fp32, out, precision="fp16", tokenizer=tokenizer, max_length=max_length),
        TENSORRT_INT8: lambda out: tensorrt_engine.build_engine(
            fp32, out, precision="int8", tokenizer=tokenizer, max_length=max_length,
            calibration_texts=calibration_texts),
    }


def load_candidate(candidate: Candidate, work: Path, *, labels: list[str], max_length: int) -> BaseClassifier:
    """A classifier on one built variant in the scratch directory."""
    if candidate.runtime == "tensorrt":
        return tensorrt_engine.TensorRTClassifier(work, engine_file=candidate.file, labels=labels,
                                                  max_length=max_length)
    return OnnxClassifier(work, model_file=candidate.file, labels=labels, max_length=max_length)


