"""TensorRT engines for NVIDIA GPUs: build fp16 / int8 engines from the ONNX export, and run them.

Building (:func:`build_engine`) parses the fp32 ONNX graph with TensorRT's ONNX parser and builds a
serialised engine (``model.plan``) with one optimisation profile over dynamic batch and sequence
axes: ``min (1, 1)``, ``opt (OPT_BATCH, min(OPT_SEQUENCE, max_length))``, ``max (max_batch,
max_length)``. fp16 engines set the FP16 builder flag; int8 engines set INT8 and FP16 (layers TensorRT
cannot run in int8 fall back to fp16) and are calibrated with an ``IInt8EntropyCalibrator2`` fed with
tokenised validation texts. TensorRT calibrates at the profile's ``opt`` shape, so the calibration
texts are cut into batches of ``OPT_BATCH`` rows (the last one filled up cyclically) padded or truncated
to the ``opt`` sequence length.

Running (:class:`TensorRTClassifier`) deserialises the plan on the current CUDA device, feeds it the
directory's tokenizer output (device buffers are torch CUDA tensors, so no pycuda is needed) and
splits batches larger than the profile allows. An engine is tied to its TensorRT version and GPU
architecture: both are recorded in ``tuneloop.json`` (``tensorrt.version``, ``tensorrt.gpu``) and a
version mismatch is a clear :class:`ModelError` at load.

``tensorrt`` and CUDA torch are imported inside functions only: this module imports, and reports
why it cannot run, on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tuneloop.errors import CompressionError, ModelError
from tuneloop.runtime import (
    MODEL_INPUTS,
    BaseClassifier,
    _labels,
    _load_tokenizer,
    _max_length,
    _optional_metadata,
)

PLAN_FILE = "model.plan"
OPT_BATCH = 8
OPT_SEQUENCE = 64
MAX_BATCH = 64
WORKSPACE_BYTES = 2 << 30
PRECISIONS = ("fp16", "int8")


def unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built or run here, or ``None`` when a CUDA device and the
    ``tensorrt`` package are both present."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'tuneloop[gpu]')"
    return None


def environment() -> dict[str, str]:
    """The TensorRT version and GPU an engine built here is tied to."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "version": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    precision: str,
    tokenizer: Any,
    max_length: int,
    calibration_texts: Sequence[str] = (),
    max_batch: int = MAX_BATCH,
) -> dict[str, Any]:
    """Build and serialise a TensorRT engine from an ONNX classifier graph.

    Args:
        onnx_path: the fp32 ONNX export (inputs among ``input_ids``, ``attention_mask``,
            ``token_type_ids``; output ``logits``), dynamic batch and sequence axes.
        plan_path: where the serialised engine is written.
        precision: ``fp16`` or ``int8``.
        tokenizer: the model's tokenizer (int8 calibration input).
        max_length: the longest sequence the engine accepts (the profile's max).
        calibration_texts: validation texts that calibrate int8 (required for ``int8``).
        max_batch: the largest batch the profile accepts; larger batches are split at run time.

    Returns:
        what the engine is tied to and how it was built: TensorRT version, GPU, profile, precision.

    Raises:
        CompressionError: no GPU/TensorRT here, the ONNX parser rejected the graph, or the build failed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    reason = unavailable_reason()
    if reason:
        raise CompressionError(f"cannot build a TensorRT engine: {reason}", stage="compression", path=str(onnx_path))
    if precision == "int8" and not calibration_texts:
        raise CompressionError("int8 TensorRT engines need calibration texts", stage="compression")
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompressionError(f"TensorRT cannot parse {onnx_path.name}: {errors}", stage="compression",
                               path=str(onnx_path))

    opt_sequence = min(OPT_SEQUENCE, max_length)
    opt_batch = min(OPT_BATCH, max_batch)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        profile.set_shape(tensor.name, (1, 1), (opt_batch, opt_sequence), (max_batch, max_length))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise CompressionError(
                f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (implicit int8 calibration was "
                f"removed); leave tensorrt_int8 out of compression.variants", stage="compression",
            )
        config.set_flag(trt.BuilderFlag.INT8)
        batches = calibration_batches(
            tokenizer, calibration_texts, [tensor.name for tensor in inputs], batch=opt_batch, sequence=opt_sequence
        )
        dtypes = {tensor.name: _torch_dtype(trt, tensor.dtype) for tensor in inputs}
        calibrator = _entropy_calibrator(trt)(batches, dtypes)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressionError(f"TensorRT could not build a {precision} engine from {onnx_path.name} (see the "
                               f"TensorRT log above)", stage="compression", path=str(onnx_path))
    plan_path.write_bytes(bytes(serialized))
    return {
        **environment(),
        "precision": precision,
        "profile": {"min": [1, 1], "opt": [opt_batch, opt_sequence], "max": [max_batch, max_length]},
        "calibration": {"calibrator": "IInt8EntropyCalibrator2", "rows": len(calibration_texts)}
        if calibrator is not None else None,
    }


def calibration_batches(
    tokenizer: Any, texts: Sequence[str], names: Sequence[str], *, batch: int, sequence: int
) -> list[dict[str, np.ndarray]]:
    """Tokenised calibration batches of exactly ``batch`` x ``sequence`` (TensorRT calibrates at the
    profile's opt shape): texts padded or truncated to ``sequence`` tokens, the last batch filled
    up cyclically from the first texts."""
    texts = ["" if text is None else str(text) for text in texts]
    if not texts:
        return []
    count = -(-len(texts) // batch) * batch
    rows = [texts[i % len(texts)] for i in range(count)]
    encoded = tokenizer(rows, padding="max_length", truncation=True, max_length=sequence, return_tensors="np")
    batches = []
    for start in range(0, count, batch):
        feed = {}
        for name in names:
            if name in encoded:
                feed[name] = np.ascontiguousarray(encoded[name][start : start + batch], dtype=np.int64)
            else:
                feed[name] = np.zeros((batch, sequence), dtype=np.int64)
        batches.append(feed)
    return batches


class TensorRTClassifier(BaseClassifier):
    """A deserialised TensorRT engine (``model.plan``) on the current CUDA device, plus the tokenizer.

    Args:
        directory: the Compressed Model directory (tokenizer files, ``model.plan``, ``tuneloop.json``).
        engine_file: the engine inside ``directory`` (compression scores several variants).
        labels, max_length: override what ``tuneloop.json`` records (needed when it is absent).

    Raises:
        ModelError: this machine has no NVIDIA GPU or no TensorRT; the engine file is missing, was
            built with another TensorRT version, or cannot be deserialised here; or its output does
            not match the number of labels.
    """

    runtime = "tensorrt"

    def __init__(
        self,
        directory: str | Path,
        *,
        engine_file: str = PLAN_FILE,
        labels: list[str] | None = None,
        max_length: int | None = None,
    ) -> None:
        directory = Path(directory)
        reason = unavailable_reason()
        if reason:
            raise ModelError(
                f"model {directory} needs an NVIDIA GPU with TensorRT; this machine has none ({reason}). "
                f"Serve it from the tuneloop GPU image, or compress with the ONNX Runtime variants to run on CPU.",
                path=str(directory),
                field="runtime",
            )
        import tensorrt as trt
        import torch

        self.engine_path = directory / engine_file
        if not self.engine_path.is_file():
            raise ModelError(f"compressed model directory {directory} has no {engine_file}", path=str(self.engine_path))
        metadata = _optional_metadata(directory)
        recorded = metadata.get("tensorrt") or {}
        here = environment()
        if recorded.get("version") and recorded["version"] != here["version"]:
            raise ModelError(
                f"{self.engine_path} was built with TensorRT {recorded['version']} on {recorded.get('gpu', '?')}; "
                f"this machine has TensorRT {here['version']} on {here['gpu']}. Rebuild the engine (compress) here.",
                path=str(self.engine_path),
                field="tensorrt.version",
            )
        labels = labels if labels is not None else _labels(directory, metadata, None)
        tokenizer = _load_tokenizer(directory)
        super().__init__(directory, tokenizer, labels, max_length or _max_length(metadata, tokenizer))

        self._torch, self._trt = torch, trt
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ModelError(
                f"{self.engine_path} is not a TensorRT engine this machine can run (corrupt file, or built for "
                f"another GPU: recorded {recorded.get('gpu', 'unknown')}, here {here['gpu']})",
                path=str(self.engine_path),
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        unknown = [name for name in self.input_names if name not in MODEL_INPUTS]
        if unknown or len(outputs) != 1:
            raise ModelError(
                f"{self.engine_path} has inputs {self.input_names} and outputs {outputs}; expected tokenizer inputs "
                f"({', '.join(MODEL_INPUTS)}) and one logits output",
                path=str(self.engine_path),
            )
        self.output_name = outputs[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_names[0], 0)[2][0])
        self._dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name)) for name in names}
        width = self.engine.get_tensor_shape(self.output_name)[-1]
        if width > 0 and width != len(self.labels):
            raise ModelError(
                f"{self.engine_path} outputs {width} logits but tuneloop.json names {len(self.labels)} labels",
                path=str(self.engine_path),
            )

    def _logits(self, texts: list[str]) -> np.ndarray:
        encoded = self._encode(texts, "np")
        parts = [self._run_batch(encoded, start, min(start + self.max_batch, len(texts)))
                 for start in range(0, len(texts), self.max_batch)]
        return np.concatenate(parts, axis=0)

    def _run_batch(self, encoded: Any, start: int, stop: int) -> np.ndarray:
        torch = self._torch
        keep = []
        for name in self.input_names:
            if name in encoded:
                array = np.asarray(encoded[name][start:stop])
            elif name == "token_type_ids":
                array = np.zeros_like(np.asarray(encoded["input_ids"][start:stop]))
            else:
                raise ModelError(f"the tokenizer in {self.directory} produces no {name!r}", path=str(self.directory))
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype=self._dtypes[name])
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        output = torch.empty(shape, dtype=self._dtypes[self.output_name], device=self.device)
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ModelError(f"TensorRT failed to run {self.engine_path}", path=str(self.engine_path))
        stream.synchronize()
        return output.float().cpu().numpy()


def _network_flags(trt) -> int:
    """Explicit batch: the default (and only mode) from TensorRT 10; a flag before it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if flag is None or int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(flag)


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise ModelError(f"TensorRT tensor type {dtype} is not supported by tuneloop")
    return table[dtype]


def _entropy_calibrator(trt):
    """An ``IInt8EntropyCalibrator2`` over prepared batches, copied to the GPU one at a time."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self, batches: list[dict[str, np.ndarray]], dtypes: dict[str, Any]) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = batches
            self.dtypes = dtypes
            self.index = 0
            self.device_tensors: list[Any] = []
            self.cache: bytes | None = None

        def get_batch_size(self) -> int:
            return int(next(iter(self.batches[0].values())).shape[0]) if self.batches else 1

        def get_batch(self, names, *args):
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            self.index += 1
            self.device_tensors = [
                torch.from_numpy(batch[name]).to("cuda", dtype=self.dtypes.get(name, torch.int64)).contiguous()
                for name in names
            ]
            return [int(tensor.data_ptr()) for tensor in self.device_tensors]

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

    return EntropyCalibrator
