"""Loading a model directory for inference: the one way compression, evaluation and serving predict.

A directory is either a Model (Hugging Face checkpoint + ``tuneloop.json`` with ``kind: model``),
run eagerly in torch fp32, or a Compressed Model whose ``tuneloop.json`` names its ``runtime``:

- ``onnxruntime``: ``model.onnx`` on an ONNX Runtime CPU session;
- ``torch``: a Hugging Face checkpoint run eagerly in fp32;
- ``tensorrt``: ``model.plan``, served by ``tuneloop.tensorrt_engine.TensorRTClassifier`` on an NVIDIA
  GPU. That module imports everywhere (``tensorrt`` is imported lazily); on a machine without a CUDA
  device or without TensorRT, loading fails with a clear :class:`ModelError` ("model X needs an
  NVIDIA GPU with TensorRT; this machine has none").

Every classifier tokenises with the directory's own tokenizer, truncates to the recorded
``max_length`` and pads each batch dynamically (to its longest text, batches formed from texts of
similar length), and returns softmax probabilities in the order of ``labels``. Every runtime divides
the logits by the ``temperature`` that ``tuneloop.json`` records (fitted on validation by the gate,
:mod:`tuneloop.calibration`; absent: 1.0), so a served confidence is a calibrated one.
"""

from __future__ import annotations

import abc

import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from tuneloop.artifacts import METADATA_FILE, read_metadata
from tuneloop.errors import ModelError

ONNX_FILE = "model.onnx"
TENSORRT_MODULE = "tuneloop.tensorrt_engine"
RUNTIMES = ("onnxruntime", "torch", "tensorrt")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The tokenizer outputs a sequence classifier may take, in the order the ONNX graph declares them."""
THREADS_ENV = "TUNELOOP_ORT_THREADS"
DEFAULT_MAX_LENGTH = 512


@runtime_checkable
class Classifier(Protocol):
    """What every loaded model offers: label names and batched prediction."""

    labels: list[str]

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities, shape ``[len(texts), len(labels)]``."""
        ...

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        """The most probable label name of each text."""
        ...


class BaseClassifier(abc.ABC):
    """Shared batching, softmax and argmax; subclasses implement :meth:`_logits` for one batch."""

    runtime = "base"
    temperature = 1.0
    """Softmax temperature (temperature scaling); :func:`load_classifier` sets the recorded one."""

    def __init__(self, directory: Path, tokenizer: Any, labels: list[str], max_length: int) -> None:
        self.directory = directory
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_length = int(max_length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, labels={self.labels})"

    @abc.abstractmethod
    def _logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits, shape [len(texts), len(labels)], for one batch of texts."""

    def _encode(self, texts: list[str], tensors: str) -> dict[str, Any]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors=tensors
        )

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities, shape ``[len(texts), len(labels)]``, rows in input order.

        Texts are batched by similar length so that dynamic padding stays short; ``None`` counts as
        the empty text.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        clean = ["" if text is None else str(text) for text in texts]
        probabilities = np.empty((len(clean), len(self.labels)), dtype=np.float32)
        if not clean:
            return probabilities
        order = np.argsort([len(text) for text in clean], kind="stable")
        for start in range(0, len(clean), batch_size):
            rows = order[start : start + batch_size]
            logits = np.asarray(self._logits([clean[i] for i in rows]), dtype=np.float32)
            probabilities[rows] = softmax(logits / self.temperature if self.temperature != 1.0 else logits)
        return probabilities

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        """The most probable label name of each text, in input order."""
        probabilities = self.predict_proba(texts, batch_size=batch_size)
        return [self.labels[i] for i in probabilities.argmax(axis=1)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


class OnnxClassifier(BaseClassifier):
    """An ONNX Runtime CPU session on ``model.onnx`` plus the directory's tokenizer.

    Args:
        directory: the Compressed Model directory (tokenizer files, ``model.onnx``, ``tuneloop.json``).
        model_file: the ONNX file inside ``directory`` (compression scores several variants).
        labels, max_length: override what ``tuneloop.json`` records (needed when it is absent).
        threads: intra-op threads; default ``$TUNELOOP_ORT_THREADS`` or the CPUs this process may use.

    Raises:
        ModelError: the ONNX file is missing or not a loadable model, the tokenizer is missing, or
            the graph's output does not match the number of labels.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        directory: str | Path,
        *,
        model_file: str = ONNX_FILE,
        labels: list[str] | None = None,
        max_length: int | None = None,
        threads: int | None = None,
    ) -> None:
        directory = Path(directory)
        self.model_path = directory / model_file
        if not self.model_path.is_file():
            raise ModelError(f"compressed model directory {directory} has no {model_file}", path=str(self.model_path))
        metadata = _optional_metadata(directory) if labels is None or max_length is None else {}
        labels = labels if labels is not None else _labels(directory, metadata, None)
        tokenizer = _load_tokenizer(directory)
        max_length = max_length or _max_length(metadata, tokenizer)
        super().__init__(directory, tokenizer, labels, max_length)
        self.threads = threads or default_threads()
        self.session = _onnx_session(self.model_path, self.threads)
        self.input_names = [node.name for node in self.session.get_inputs()]
        unknown = [name for name in self.input_names if name not in MODEL_INPUTS]
        if unknown:
            raise ModelError(
                f"{self.model_path} expects inputs {unknown} that a tokenizer does not produce "
                f"(known inputs: {', '.join(MODEL_INPUTS)})",
                path=str(self.model_path),
            )
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ModelError(
                f"{self.model_path} outputs {width} logits but tuneloop.json names {len(self.labels)} labels",
                path=str(self.model_path),
            )

    def _logits(self, texts: list[str]) -> np.ndarray:
        encoded = self._encode(texts, "np")
        feed = {}
        for name in self.input_names:
            if name in encoded:
                feed[name] = np.asarray(encoded[name], dtype=np.int64)
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(np.asarray(encoded["input_ids"], dtype=np.int64))
            else:
                raise ModelError(f"the tokenizer in {self.directory} produces no {name!r}", path=str(self.directory))
        return self.session.run(None, feed)[0]


class TorchClassifier(BaseClassifier):
    """A Hugging Face sequence classifier run eagerly in fp32 on CPU under ``torch.inference_mode()``.

    Raises:
        ModelError: the checkpoint or tokenizer cannot be loaded, or its labels disagree with
            ``tuneloop.json``.
    """

    runtime = "torch"

    def __init__(self, directory: str | Path, *, labels: list[str] | None = None, max_length: int | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        directory = Path(directory)
        metadata = _optional_metadata(directory)
        tokenizer = _load_tokenizer(directory)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ModelError(f"cannot load the checkpoint in {directory}: {error}", path=str(directory)) from error
        labels = labels if labels is not None else _labels(directory, metadata, model.config)
        if model.config.num_labels != len(labels):
            raise ModelError(
                f"{directory}: the checkpoint has {model.config.num_labels} outputs but tuneloop.json names "
                f"{len(labels)} labels",
                path=str(directory),
            )
        super().__init__(directory, tokenizer, labels, max_length or _max_length(metadata, tokenizer))
        self.model = model.to("cpu").eval()
        self._torch = torch

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, directory: str | Path, labels: list[str],
                   max_length: int) -> "TorchClassifier":
        """Wrap a model already in memory (a distilled or pruned student), moved to CPU in eval mode.

        ``directory`` is where it came from, for messages only."""
        import torch

        classifier = cls.__new__(cls)
        BaseClassifier.__init__(classifier, Path(directory), tokenizer, labels, max_length)
        classifier.model = model.to("cpu").eval()
        classifier._torch = torch
        return classifier

    def _logits(self, texts: list[str]) -> np.ndarray:
        with self._torch.inference_mode():
            encoded = self._encode(texts, "pt")
            return self.model(**encoded).logits.float().numpy()


def load_classifier(directory: str | Path) -> Classifier:
    """Load a Model or Compressed Model directory for inference, by what its ``tuneloop.json`` says.

    ``runtime`` decides when present (``onnxruntime``, ``torch``, ``tensorrt``); a directory of kind
    ``model`` without one is an uncompressed checkpoint and runs in torch.

    Raises:
        ModelError: the directory or its metadata is missing, the runtime is unknown, or the runtime
            cannot run here (TensorRT without an NVIDIA GPU).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}", path=str(directory))
    metadata = read_metadata(directory)
    runtime = metadata.get("runtime")
    if runtime is None and metadata.get("kind") == "model":
        runtime = "torch"
    if runtime in RUNTIMES:
        classifier = {"onnxruntime": OnnxClassifier, "torch": TorchClassifier,
                      "tensorrt": _tensorrt_classifier}[runtime](directory)
        classifier.temperature = _temperature(directory, metadata)
        return classifier
    raise ModelError(
        f"{directory / METADATA_FILE}: unknown runtime {runtime!r} (kind {metadata.get('kind')!r}); "
        f"expected one of {', '.join(RUNTIMES)}",
        path=str(directory / METADATA_FILE),
        field="runtime",
    )


def _temperature(directory: Path, metadata: dict[str, Any]) -> float:
    from tuneloop.calibration import metadata_temperature

    where = directory / METADATA_FILE
    try:
        return metadata_temperature(metadata, where=str(where))
    except ValueError as error:
        raise ModelError(str(error), path=str(where), field="temperature") from None


def _tensorrt_classifier(directory: Path) -> Classifier:
    try:
        available = importlib.util.find_spec(TENSORRT_MODULE) is not None
    except ImportError:
        available = False
    if not available:
        raise ModelError(
            f"model {directory} needs an NVIDIA GPU with TensorRT; this machine has none (this installation has "
            f"no {TENSORRT_MODULE}). Serve it from the tuneloop GPU image, or compress with the ONNX Runtime "
            f"variants to run on CPU.",
            path=str(directory),
            field="runtime",
        )
    module = importlib.import_module(TENSORRT_MODULE)
    return module.TensorRTClassifier(directory)


def default_threads() -> int:
    """Intra-op threads for ONNX Runtime: ``$TUNELOOP_ORT_THREADS``, else the CPUs this process may use
    (its CPU affinity, capped by a cgroup CPU quota, as in a Kubernetes pod with a CPU limit)."""
    configured = os.environ.get(THREADS_ENV, "").strip()
    if configured:
        try:
            value = int(configured)
        except ValueError:
            raise ModelError(f"{THREADS_ENV}={configured!r} is not a whole number", field=THREADS_ENV) from None
        if value >= 1:
            return value
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may run on: affinity, capped by a cgroup v2 quota when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own pybind exception types for a bad file
        raise ModelError(
            f"{path} is not a loadable ONNX model (corrupt or truncated file?): {error}", path=str(path)
        ) from error


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"cannot load the tokenizer in {directory}: {error}", path=str(directory)) from error


def _optional_metadata(directory: Path) -> dict[str, Any]:
    return read_metadata(directory) if (directory / METADATA_FILE).is_file() else {}


def _labels(directory: Path, metadata: dict[str, Any], model_config: Any) -> list[str]:
    labels = metadata.get("labels")
    if labels:
        return [str(label) for label in labels]
    id2label = getattr(model_config, "id2label", None) if model_config is not None else None
    if id2label:
        return [str(id2label[i]) for i in sorted(id2label, key=int)]
    raise ModelError(f"{directory / METADATA_FILE} names no labels", path=str(directory / METADATA_FILE), field="labels")


def _max_length(metadata: dict[str, Any], tokenizer: Any) -> int:
    recorded = metadata.get("max_length")
    if recorded:
        return int(recorded)
    limit = getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH
    return int(min(limit, DEFAULT_MAX_LENGTH))
