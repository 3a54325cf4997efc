"""Drift on the served model's own sentence embeddings: MMD, calibrated by permutation on the reference.

**Embeddings** come from the served model itself (:func:`embedder_for`): the mean over the attention
mask of its encoder's last hidden state, L2-normalised. A torch model gives it through its base
model; an ONNX model through the last rank-3 float tensor of its graph (the encoder output, before
the classifier head), exposed as an extra output of an in-memory copy of the graph. A model that
cannot (a TensorRT engine, a graph without such a tensor) is a :class:`MonitoringError` in one line.

**Statistic**: the squared maximum mean discrepancy (biased estimate) between the reference and
the current window's embeddings, with a Gaussian kernel whose bandwidth is the median pairwise
distance of the reference sample.

**Threshold**: calibrated on reference data only, to ``monitoring.embedding_false_alarm_rate``: the
reference sample is split at random ``monitoring.embedding_permutations`` times into a pseudo-current
window of the current window's size and the rest, and the threshold is the ``1 - rate`` quantile of
those MMD values. Under no drift a window is as exchangeable with the reference as a random part
of it, so the signal fires on such a window with probability at most the rate.

**Drivers**: the current texts with the largest MMD witness value (closer to the current window
than to the reference, in kernel mean) are the examples that drive the drift; the word 1-3-grams
most over-represented among them against the reference (smoothed log-odds) name them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from tuneloop.monitoring.common import REFERENCE_SEED, STAGE, MonitoringError

EMBED_BATCH = 32
DRIVER_POOL = 0.1
"""Share of the current window (highest witness values) whose n-grams are compared with the reference."""
_TOKEN = re.compile(r"[a-z]+|[0-9]+")


class Embedder(Protocol):
    """Sentence embeddings of the served model: ``embed(texts)`` -> ``[len(texts), width]``, L2-normalised."""

    description: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


class _BatchedEmbedder:
    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier
        self.description = f"{type(classifier).__name__} of {classifier.directory}"

    def _batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, normalised embeddings, rows in input order (batched by similar length)."""
        clean = ["" if text is None else str(text) for text in texts]
        order = np.argsort([len(text) for text in clean], kind="stable")
        vectors: np.ndarray | None = None
        for start in range(0, len(clean), EMBED_BATCH):
            rows = order[start:start + EMBED_BATCH]
            batch = self._batch([clean[i] for i in rows])
            if vectors is None:
                vectors = np.empty((len(clean), batch.shape[1]), dtype=np.float32)
            vectors[rows] = batch
        return _normalise(vectors if vectors is not None else np.empty((0, 1), dtype=np.float32))


class TorchEmbedder(_BatchedEmbedder):
    """The encoder (``base_model``) of a Hugging Face sequence classifier."""

    def _batch(self, texts: list[str]) -> np.ndarray:
        torch = self.classifier._torch
        with torch.inference_mode():
            encoded = self.classifier._encode(texts, "pt")
            hidden = self.classifier.model.base_model(**encoded).last_hidden_state.float().numpy()
        return _mean_pool(hidden, encoded["attention_mask"].numpy())


class OnnxEmbedder(_BatchedEmbedder):
    """The last rank-3 float tensor of the classifier's ONNX graph, exposed as an extra output."""

    def __init__(self, classifier: Any) -> None:
        super().__init__(classifier)
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(classifier.model_path))
        hidden = _last_hidden_tensor(model)
        if hidden is None:
            raise MonitoringError(
                f"the served model {classifier.model_path} cannot produce sentence embeddings: its ONNX graph has no "
                f"[batch, tokens, width] float tensor (the encoder output); set monitoring.embedding_drift: false",
                stage=STAGE, path=str(classifier.model_path), field="monitoring.embedding_drift")
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(hidden))
        options = ort.SessionOptions()
        options.intra_op_num_threads = getattr(classifier, "threads", 1) or 1
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.output = hidden
        self.description += f" (ONNX tensor {hidden!r})"

    def _batch(self, texts: list[str]) -> np.ndarray:
        encoded = self.classifier._encode(texts, "np")
        feed = {}
        for name in self.classifier.input_names:
            values = encoded.get(name)
            feed[name] = np.asarray(values if values is not None else np.zeros_like(encoded["input_ids"]),
                                    dtype=np.int64)
        (hidden,) = self.session.run([self.output], feed)
        return _mean_pool(np.asarray(hidden, dtype=np.float32), np.asarray(encoded["attention_mask"]))


def _last_hidden_tensor(model) -> str | None:
    """The output of the last node (graph order is topological) that is a rank-3 float tensor."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot read: no embeddings from it
        return None
    ranks = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and tensor.HasField("shape"):
            ranks[info.name] = len(tensor.shape.dim)
    for node in reversed(inferred.graph.node):
        for name in node.output:
            if ranks.get(name) == 3:
                return name
    return None


def embedder_for(classifier: Any) -> Embedder:
    """The embedder of a loaded classifier (:func:`tuneloop.runtime.load_classifier`).

    Raises:
        MonitoringError: the model cannot produce sentence embeddings (one line naming it).
    """
    from tuneloop.runtime import OnnxClassifier, TorchClassifier

    if isinstance(classifier, TorchClassifier):
        return TorchEmbedder(classifier)
    if isinstance(classifier, OnnxClassifier):
        return OnnxEmbedder(classifier)
    runtime = getattr(classifier, "runtime", type(classifier).__name__)
    where = getattr(classifier, "directory", None)
    raise MonitoringError(
        f"the served model {where or classifier!r} (runtime {runtime}) cannot produce sentence embeddings for "
        f"monitoring.embedding_drift; serve an ONNX or torch variant or set monitoring.embedding_drift: false",
        stage=STAGE, path=str(where) if where else None, field="monitoring.embedding_drift")


def model_embedder(config, version: str) -> Embedder:
    """The embedder of registry ``version`` (downloaded once into the serving model cache)."""
    from tuneloop import serving

    _, directory = serving.fetch_model(config, version)
    return embedder_for(serving.load_model(Path(directory), version).classifier)


# --------------------------------------------------------------------------------------------
# The statistic and its calibration


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def median_bandwidth(reference: np.ndarray) -> float:
    """The median pairwise distance of the reference embeddings (the kernel's bandwidth)."""
    distances = np.sqrt(_squared_distances(reference, reference))
    upper = distances[np.triu_indices(len(reference), k=1)]
    return float(np.median(upper)) or 1.0


def _mmd_from_kernel(kernel: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    return float(kernel[np.ix_(first, first)].mean() + kernel[np.ix_(second, second)].mean()
                 - 2.0 * kernel[np.ix_(first, second)].mean())


@dataclass
class EmbeddingDrift:
    """The embedding signal of one check."""

    score: float
    threshold: float
    drifted: bool
    false_alarm_rate: float
    permutations: int
    bandwidth: float
    reference_rows: int
    current_rows: int
    drivers: dict

    def to_dict(self) -> dict:
        return {"column": "embedding", "kind": "embedding", "method": "mmd (permutation-calibrated)",
                "score": self.score, "threshold": self.threshold, "drifted": self.drifted,
                "false_alarm_rate": self.false_alarm_rate, "permutations": self.permutations,
                "bandwidth": self.bandwidth, "reference_rows": self.reference_rows,
                "current_rows": self.current_rows, "drivers": self.drivers}


def embedding_drift(reference: np.ndarray, current: np.ndarray, *, false_alarm_rate: float, permutations: int,
                    current_texts: Sequence[str], reference_texts: Sequence[str], drivers: int,
                    seed: int = REFERENCE_SEED) -> EmbeddingDrift:
    """MMD between ``reference`` and ``current`` embeddings, with its permutation-calibrated threshold
    and the drivers of the current window (see the module docstring)."""
    rng = np.random.default_rng(seed)
    bandwidth = median_bandwidth(reference)
    pooled = np.vstack([reference, current])
    kernel = np.exp(-_squared_distances(pooled, pooled) / (2.0 * bandwidth ** 2))
    n_reference, n_current = len(reference), len(current)
    score = _mmd_from_kernel(kernel, np.arange(n_reference), np.arange(n_reference, n_reference + n_current))
    # Calibration on reference rows only: a random part the size of the window against the rest.
    size = min(n_current, n_reference // 2)
    null = []
    for _ in range(permutations):
        order = rng.permutation(n_reference)
        null.append(_mmd_from_kernel(kernel, order[size:], order[:size]))
    # A window of a different size than the pseudo-windows: the statistic's null scales with 1/n.
    scale = (1.0 / size + 1.0 / (n_reference - size)) / (1.0 / n_current + 1.0 / n_reference)
    threshold = float(np.quantile(null, 1.0 - false_alarm_rate, method="higher") * scale)
    witness = kernel[n_reference:, n_reference:].mean(axis=1) - kernel[n_reference:, :n_reference].mean(axis=1)
    found = _drivers(witness, current_texts, reference_texts, drivers) if score > threshold else {}
    return EmbeddingDrift(score=score, threshold=threshold, drifted=bool(score > threshold),
                          false_alarm_rate=false_alarm_rate, permutations=permutations, bandwidth=bandwidth,
                          reference_rows=n_reference, current_rows=n_current, drivers=found)


def _ngrams(text: str) -> set[str]:
    tokens = _TOKEN.findall(str(text).lower())
    tokens = ["<num>" if token.isdigit() else token for token in tokens]
    grams = set()
    for n in (1, 2, 3):
        grams.update(" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return grams


def _drivers(witness: np.ndarray, current_texts: Sequence[str], reference_texts: Sequence[str], top: int) -> dict:
    """The texts that drive the drift and the n-grams that name them."""
    order = np.argsort(-witness)
    pool = order[:max(int(len(order) * DRIVER_POOL), min(top, len(order)))]
    driving = Counter(gram for i in pool for gram in _ngrams(current_texts[i]))
    reference = Counter(gram for text in reference_texts for gram in _ngrams(text))
    pool_size, reference_size = len(pool), max(len(reference_texts), 1)
    scored = []
    for gram, count in driving.items():
        share, base = (count + 0.5) / (pool_size + 1.0), (reference.get(gram, 0) + 0.5) / (reference_size + 1.0)
        if count >= 2:
            scored.append((float(np.log(share / base)), gram, count))
    scored.sort(reverse=True)
    return {
        "ngrams": [{"ngram": gram, "driving_share": round(count / pool_size, 3),
                    "reference_share": round(reference.get(gram, 0) / reference_size, 4),
                    "log_odds": round(score, 2)} for score, gram, count in scored[:top]],
        "examples": [{"text": str(current_texts[i])[:200], "witness": round(float(witness[i]), 4)}
                     for i in order[:top]],
    }
