"""ONNX export of a loaded torch classifier: dynamic batch and sequence axes, eager attention (the
pattern ONNX Runtime's transformer optimizer fuses), checked with ``onnx.checker`` and against the
torch logits."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneloop.compression.common import STAGE, first_line
from tuneloop.errors import CompressionError
from tuneloop.runtime import MODEL_INPUTS, TorchClassifier

PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3
EXPORT_SAMPLE_TEXTS = [
    "a short text",
    "a somewhat longer text, so that the export batch holds padding",
]
PARITY_SAMPLE_TEXTS = [
    "x",
    "three texts of different lengths check the dynamic batch and sequence axes",
    "hello world",
]


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
    names = input_names(model)
    sample = model.tokenizer(EXPORT_SAMPLE_TEXTS, padding=True, truncation=True, max_length=model.max_length,
                             return_tensors="pt")
    args = tuple(sample[name] for name in names)
    failures = []
    with _eager_attention(model.model):
        wrapper = _LogitsOnly(model.model, names).eval()
        for exporter in ("torchscript", "dynamo"):
            try:
                _torch_export(wrapper, args, names, path, opset=opset, dynamo=exporter == "dynamo")
                check_graph(path)
                _check_parity(model, path, names)
                return exporter
            except Exception as error:  # every exporter failure is reported together below
                failures.append(f"{exporter} exporter: {type(error).__name__}: {first_line(error)}")
                path.unlink(missing_ok=True)
    kind = model_type(model)
    raise CompressionError(
        f"cannot export model type {kind!r} ({type(model.model).__name__}) to ONNX: " + "; ".join(failures),
        stage=STAGE,
        path=str(model.directory),
        field="model_type",
    )


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


def check_graph(path: Path) -> None:
    """``onnx.checker`` on a written graph (raises on an invalid one)."""
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


def input_names(model: TorchClassifier) -> list[str]:
    """The tokenizer outputs the model's ``forward`` takes, in the ONNX graph's input order."""
    produced = set(model.tokenizer(EXPORT_SAMPLE_TEXTS[:1]).keys())
    accepted = set(inspect.signature(model.model.forward).parameters)
    names = [name for name in MODEL_INPUTS if name in produced and name in accepted]
    if "input_ids" not in names:
        raise CompressionError(
            f"model type {model_type(model)!r} does not take input_ids from its tokenizer; cannot export it",
            stage=STAGE, path=str(model.directory), field="model_type",
        )
    return names


def model_type(model: TorchClassifier) -> str:
    """The Hugging Face model type (``bert``), else the model's class name."""
    return str(getattr(model.model.config, "model_type", None) or type(model.model).__name__)


