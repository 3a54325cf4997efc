"""Classification metrics shared by training, compression, evaluation and benchmarks."""

from __future__ import annotations

from typing import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Args:
        y_true: true label names.
        y_pred: predicted label names.
        labels: every label name, in model output order (fixes the matrix layout).

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {label: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": [[...]] (rows true, columns predicted), "labels", "rows"}``.
    """
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred, labels),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": list(labels),
        "rows": len(y_true),
    }


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: list[str]) -> float:
    """Macro-averaged F1 over ``labels`` (a class absent from both sides scores 0)."""
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
