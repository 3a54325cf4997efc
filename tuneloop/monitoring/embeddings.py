"""Drift on the served model's own sentence embeddings: a domain classifier, calibrated by permutation on
the reference.

**Embeddings** come from the served model itself (:func:`embedder_for`): the mean over the attention
mask of its encoder's last hidden state, L2-normalised. A torch model gives it through its base
model; an ONNX model through the last rank-3 float tensor of its graph (the encoder output, before
the classifier head), exposed as an extra output of an in-memory copy of the graph. A model that
cannot (a TensorRT engine, a graph without such a tensor) is a :class:`MonitoringError` in one line.

**Statistic**: a domain classifier between the reference and the current window: the k-nearest-
neighbour classifier (k = 10, cosine similarity of the normalised embeddings), scored leave-one-out.
The score is the share of window texts it assigns to the window with confidence (at least 70% of
their neighbours are window texts). A campaign that is a small share of the traffic forms
neighbourhoods of its own, so the score grows with its share; window texts like the reference's mix
with it and add only noise. (A mean score over all window texts, or a kernel MMD, dilutes a 10%
campaign in the other 90%: they caught about half of such windows in ``benchmarks/drift.py``.)

**Distinct texts**: each side is reduced to its distinct texts before sampling. Live traffic repeats
popular messages verbatim while the reference (a deduplicated training split) does not, and the
copies of one message would be each other's nearest neighbours, so a window of ordinary repeats
would read as a campaign. A campaign sent as one verbatim message is therefore left to the column
signals (length, URL and digit shares) and the prediction drift; templated campaigns, whose copies
differ in a link or a number, remain distinct texts and form their own neighbourhoods.

**Threshold**: calibrated on reference data only, to ``monitoring.embedding_false_alarm_rate``: the
reference sample is split at random ``monitoring.embedding_permutations`` times into a pseudo-window
and the rest, in the proportion of the window to the reference, and the threshold is the
``1 - rate`` quantile of those scores. Under no drift the window is as exchangeable with the
reference as a random part of it; the pseudo-window is smaller than the window, so its scores vary
more and the threshold errs high.

**Drivers**: the current texts whose neighbours are most often current texts (where the classifier
tells the window from the reference best) are the examples that drive the drift; the word 1-3-grams
most over-represented among them against the reference (smoothed log-odds) name them.
"""

from __future__ import annotations

import abc

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


class _BatchedEmbedder(abc.ABC):
    """Embeds texts in length-sorted batches; a runtime subclass says how one batch is embedded."""

    def __init__(self, classifier: Any) -> None:
        self.classifier = classifier
        self.description = f"{type(classifier).__name__} of {classifier.directory}"

    @abc.abstractmethod
    def _batch(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled embeddings of one batch, rows in input order."""

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
    """The encoder output of a sequence classifier's graph: what its head pools (found by structure,
    so fused graphs with contrib operators work too), else the last rank-3 float tensor."""
    return _pooled_input(model) or _last_rank3_tensor(model)


def _pooled_input(model, depth: int = 12) -> str | None:
    """Walking back from the logits: the tensor the head's first-token ``Gather``/``Slice`` reads."""
    producers = {name: node for node in model.graph.node for name in node.output}
    constants = {initializer.name for initializer in model.graph.initializer}
    constants |= {name for node in model.graph.node if node.op_type == "Constant" for name in node.output}
    frontier = [model.graph.output[0].name]
    for _ in range(depth):
        following = []
        for name in frontier:
            node = producers.get(name)
            if node is None:
                continue
            if node.op_type in ("Gather", "Slice") and node.input and node.input[0] not in constants:
                return node.input[0]
            following.extend(value for value in node.input if value and value not in constants)
        frontier = following
    return None


def _last_rank3_tensor(model) -> str | None:
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


NEIGHBOURS = 10
"""k of the nearest-neighbour domain classifier."""


def neighbours(vectors: np.ndarray, k: int = NEIGHBOURS, seed: int = REFERENCE_SEED) -> np.ndarray:
    """The indices of each row's ``k`` most similar other rows (cosine: the rows are normalised).

    Ties (the same text twice) are broken at random: by position they would favour one side."""
    similarity = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    similarity += np.random.default_rng(seed).uniform(0.0, 1e-9, similarity.shape)
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(vectors) - 1)
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


CONFIDENT = 0.7
"""A window text counts as recognised when at least this share of its neighbours are window texts."""


def domain_score(graph: np.ndarray, is_current: np.ndarray) -> tuple[float, np.ndarray]:
    """The k-NN domain classifier's score, scored leave-one-out: the share of current rows it assigns
    to the current window with confidence (at least :data:`CONFIDENT` of their neighbours current),
    and each current row's share of current neighbours.

    A campaign forms neighbourhoods of its own, so the score grows with its share of the window; the
    rest of the window, mixed with the reference, adds only noise."""
    current = np.flatnonzero(is_current)
    shares = is_current[graph[current]].mean(axis=1)
    return float((shares >= CONFIDENT).mean()), shares


@dataclass
class EmbeddingDrift:
    """The embedding signal of one check."""

    score: float
    threshold: float
    drifted: bool
    false_alarm_rate: float
    permutations: int
    neighbours: int
    reference_rows: int
    current_rows: int
    drivers: dict

    def to_dict(self) -> dict:
        return {"column": "embedding", "kind": "embedding", "method": "k-NN domain classifier (permutation-calibrated)",
                "score": self.score, "threshold": self.threshold, "drifted": self.drifted,
                "false_alarm_rate": self.false_alarm_rate, "permutations": self.permutations,
                "neighbours": self.neighbours, "reference_rows": self.reference_rows,
                "current_rows": self.current_rows, "drivers": self.drivers}


def calibrated_threshold(reference: np.ndarray, current_rows: int, *, false_alarm_rate: float, permutations: int,
                         seed: int = REFERENCE_SEED) -> float:
    """The ``1 - false_alarm_rate`` quantile of the score between random parts of the reference: a
    pseudo-window and the rest, in the proportion of the window to the reference (the score depends
    on it), so the pseudo-window is smaller than the window and its scores vary more: conservative."""
    rng = np.random.default_rng(seed)
    graph = neighbours(reference)
    size = int(round(len(reference) * current_rows / (current_rows + len(reference))))
    size = min(max(size, 2), len(reference) - 2)
    null = []
    for _ in range(permutations):
        is_current = np.zeros(len(reference), dtype=bool)
        is_current[rng.choice(len(reference), size, replace=False)] = True
        null.append(domain_score(graph, is_current)[0])
    return float(np.quantile(null, 1.0 - false_alarm_rate, method="higher"))


def embedding_drift(reference: np.ndarray, current: np.ndarray, *, false_alarm_rate: float, permutations: int,
                    current_texts: Sequence[str], reference_texts: Sequence[str], drivers: int,
                    seed: int = REFERENCE_SEED) -> EmbeddingDrift:
    """The k-NN domain classifier between ``reference`` and ``current`` embeddings, with its
    permutation-calibrated threshold and the drivers of the current window (module docstring)."""
    threshold = calibrated_threshold(reference, len(current), false_alarm_rate=false_alarm_rate,
                                     permutations=permutations, seed=seed)
    pooled = np.vstack([reference, current])
    is_current = np.zeros(len(pooled), dtype=bool)
    is_current[len(reference):] = True
    score, shares = domain_score(neighbours(pooled), is_current)
    drifted = bool(score > threshold)
    found = _drivers(shares, current_texts, reference_texts, drivers) if drifted else {}
    return EmbeddingDrift(score=score, threshold=threshold, drifted=drifted, false_alarm_rate=false_alarm_rate,
                          permutations=permutations, neighbours=NEIGHBOURS, reference_rows=len(reference),
                          current_rows=len(current), drivers=found)


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
        "examples": [{"text": str(current_texts[i])[:200], "current_neighbours": round(float(witness[i]), 2)}
                     for i in order[:top]],
    }
