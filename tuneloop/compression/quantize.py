"""Recipes that turn an fp32 ONNX export into a faster graph: ONNX Runtime's transformer fusions,
dynamic int8 and calibrated static int8 (QDQ), plus the calibration sample they share with TensorRT."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tuneloop.compression.common import STAGE, first_line
from tuneloop.compression.common import log as log_line
from tuneloop.compression.export import check_graph
from tuneloop.errors import CompressionError

QUANTIZED_OP_TYPES = ["MatMul", "Gather"]
"""int8 weights for the dense layers (MatMul) and the embedding tables (Gather). Measured on MiniLM-L6
fine-tuned on SMS spam: per-channel MatMul weights cost 0.25 macro-F1 points where per-tensor cost 1.5;
adding Gather (embeddings) shrinks the file from 59 MB to 23 MB at no further loss."""
PER_CHANNEL = True
STATIC_CALIBRATION_METHOD = "MinMax"
"""Histogram calibrators (Entropy, Percentile) need equal shapes across calibration runs; texts differ
in length, and MinMax lost no more macro-F1 than per-tensor alternatives on MiniLM-L6."""
EMBEDDING_BITS = 4
EMBEDDING_BLOCK = 32
"""4-bit embedding tables, one scale per 32 values along the hidden axis (``GatherBlockQuantized``):
the table is most of a small encoder's bytes (MiniLM-L6: 11.7M of 22.7M parameters)."""
CALIBRATION_FLUSH = 16
"""Calibration runs whose intermediate outputs are kept before they are reduced (bounds memory)."""


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
            log_line(f"note: {note}")
    indices = np.linspace(0, available - 1, take).round().astype(int) if take else np.array([], dtype=int)
    record = {"requested_rows": rows, "rows": take, "capped": rows > available, "note": note,
              "sample": "evenly spaced over the validation split"}
    return [texts[i] for i in indices], record


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

    with _failure_explained(fp32_path, "int8 dynamic quantization",
                            "leave onnx_int8_dynamic out of compression.variants to skip it"):
        with _quiet_quantizer():
            quantize_dynamic(
                Path(fp32_path),
                Path(int8_path),
                op_types_to_quantize=QUANTIZED_OP_TYPES,
                per_channel=PER_CHANNEL,
                reduce_range=False,
                weight_type=QuantType.QInt8,
            )
        check_graph(Path(int8_path))
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
    with _failure_explained(fp32_path, "int8 static quantization",
                            "leave onnx_int8_static out of compression.variants to skip it"):
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
        check_graph(Path(int8_path))
    return {"method": "int8_static", "format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8",
            "per_channel": PER_CHANNEL, "op_types": QUANTIZED_OP_TYPES, "matmul_const_b_only": True,
            "calibration_method": STATIC_CALIBRATION_METHOD, "calibration_rows": len(texts)}


@contextlib.contextmanager
def _failure_explained(fp32_path: str | Path, recipe: str, remedy: str):
    """Turn any error of a quantizer (they raise many types) or of the graph check into a
    CompressionError naming the ``recipe``, the export and the ``remedy``."""
    try:
        yield
    except Exception as error:
        raise CompressionError(
            f"{recipe} of {fp32_path} failed: {first_line(error)}; {remedy}",
            stage=STAGE,
            path=str(fp32_path),
            field="compression.variants",
        ) from error


@contextlib.contextmanager
def _quiet_quantizer():
    """Drop the quantizer's advice to run its pre-processing (the root logger's one repeated warning),
    and its per-tensor INFO lines, which the KFP executor's INFO root logger would print by the hundred."""

    def advice(record: logging.LogRecord) -> bool:
        return "consider" not in record.getMessage() or "pre-process" not in record.getMessage()

    root = logging.getLogger()
    level = root.level
    root.addFilter(advice)
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeFilter(advice)


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


def quantize_int8_int4_embeddings(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Dynamic int8 ``MatMul`` weights (per channel) with 4-bit block-quantized embedding tables.

    ONNX Runtime's ``MatMulNBitsQuantizer`` turns each embedding ``Gather`` into a
    ``GatherBlockQuantized`` (symmetric int4, blocks of ``EMBEDDING_BLOCK`` along the hidden axis);
    dynamic quantization then gives the dense layers int8 weights.

    Returns:
        the recipe.

    Raises:
        CompressionError: a quantizer failed or wrote an invalid graph.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out_path = Path(out_path)
    embeddings = out_path.with_name(out_path.stem + "_embeddings.onnx")
    # it warns that it raises the opset to 21 and the IR version to 10 for int4: expected, checked below
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    try:
        with _failure_explained(fp32_path, "int8 with 4-bit embeddings",
                                "leave the *_int8_emb4 variants out of compression.variants to skip them"):
            with _quiet_quantizer(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = DefaultWeightOnlyQuantConfig(
                    block_size=EMBEDDING_BLOCK, is_symmetric=True, quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), bits=EMBEDDING_BITS)
                quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), algo_config=config)
                quantizer.process()
                quantizer.model.save_model_to_file(str(embeddings), False)
                quantize_dynamic(embeddings, out_path, op_types_to_quantize=["MatMul"], per_channel=PER_CHANNEL,
                                 reduce_range=False, weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            check_graph(out_path)
    finally:
        embeddings.unlink(missing_ok=True)
    return {"method": "int8_dynamic_int4_embeddings", "weight_type": "QInt8", "per_channel": PER_CHANNEL,
            "op_types": ["MatMul"], "embeddings": {"op": "GatherBlockQuantized", "bits": EMBEDDING_BITS,
                                                    "block_size": EMBEDDING_BLOCK, "symmetric": True}}
