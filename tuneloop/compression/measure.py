"""Measurement in one process on the same texts: validation macro-F1 and agreement with the teacher
(torch fp32), and interleaved latency rounds so that load from other processes falls on every
variant alike."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tuneloop.compression.common import file_size, log
from tuneloop.metrics import macro_f1
from tuneloop.runtime import BaseClassifier

SCORING_BATCH_SIZE = 32
WARMUP_RUNS = 2


def score_variant(name: str, predictions: Sequence[str], truth: Sequence[str], reference: Sequence[str],
                  labels: list[str]) -> dict[str, Any]:
    """Validation macro-F1 of a variant's predictions and their argmax agreement with torch fp32."""
    score = macro_f1(truth, predictions, labels)
    agreement = float(np.mean([a == b for a, b in zip(predictions, reference)])) if len(reference) else 1.0
    log(f"{name}: validation macro-F1 {score:.4f}, agreement with torch fp32 {agreement:.4f}")
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
    return sum(file_size(path) for path in weights)


