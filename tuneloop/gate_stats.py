"""Statistics of the promotion gate: paired bootstrap intervals, McNemar's test, and the rows a
decision needs.

Every model comparison is *paired*: both models are scored on the same test rows, so each row is one
cell ``(truth, prediction A, prediction B)`` of a ``K x K x K`` table. Resampling rows with
replacement is the same as drawing the cell counts from a multinomial with the observed cell
shares, so the paired bootstrap costs ``O(resamples x K^3)`` whatever the number of rows.

A check is a claim "quantity > bound" (a non-inferiority margin is the bound ``-margin`` on the
difference). :func:`decide` reads it off a two-sided interval at ``confidence``:

- ``passed``: the whole interval lies above the bound (a truly worse model passes at most
  ``(1 - confidence) / 2`` of the time);
- ``failed``: the whole interval lies below the bound, or the test set already has the rows the
  decision needs and still cannot show the claim;
- ``undecided``: the test set is too small to tell; the check says how many rows it would need.

The rows needed are those at which an interval of this width (per-row spread taken from the
bootstrap) would exclude the bound with 80% power when the truth is the *planning value* (an equal
model for a comparison with the champion, the observed value otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

DECISION_POWER = 0.8
"""Chance that a model exactly at the planning value passes at the row count a check asks for."""

PASSED, FAILED, UNDECIDED = "passed", "failed", "undecided"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``confidence`` and its standard error."""

    estimate: float
    low: float
    high: float
    confidence: float
    se: float
    rows: int

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (``100`` for points); a negative factor swaps the ends."""
        low, high = sorted((self.low * factor, self.high * factor))
        return Interval(self.estimate * factor, low, high, self.confidence, self.se * abs(factor), self.rows)


@dataclass(frozen=True)
class Verdict:
    """What :func:`decide` made of an interval against a bound."""

    status: str
    rows_needed: int | None

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test for paired accuracy: ``a_only`` rows only A got right, ``b_only`` only B."""

    a_only: int
    b_only: int
    p_value: float
    difference: Interval


def encode(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Label names as indices into ``labels``; a name outside ``labels`` gets the extra index ``len(labels)``."""
    index = {label: i for i, label in enumerate(labels)}
    return np.fromiter((index.get(str(v), len(labels)) for v in values), dtype=np.int64, count=len(values))


def cell_counts(truth: np.ndarray, first: np.ndarray, second: np.ndarray, classes: int) -> np.ndarray:
    """Counts of each ``(truth, first, second)`` cell, flattened to ``classes ** 3``."""
    cells = (truth * classes + first) * classes + second
    return np.bincount(cells, minlength=classes**3).astype(np.int64)


def macro_f1_of_counts(confusion: np.ndarray, scored: Sequence[int]) -> np.ndarray:
    """Macro-F1 of confusion matrices ``[..., K, K]`` (rows truth) over the class indices ``scored``.

    A class with no true row and no prediction scores 0, as scikit-learn's ``zero_division=0`` does.
    """
    diagonal = np.diagonal(confusion, axis1=-2, axis2=-1)
    true_rows, predicted = confusion.sum(axis=-1), confusion.sum(axis=-2)
    scored = list(scored)
    tp = diagonal[..., scored].astype(np.float64)
    denominator = (true_rows[..., scored] + predicted[..., scored]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(denominator > 0, 2.0 * tp / np.where(denominator > 0, denominator, 1.0), 0.0)
    return f1.mean(axis=-1)


def accuracy_of_counts(confusion: np.ndarray) -> np.ndarray:
    """Accuracy of confusion matrices ``[..., K, K]``."""
    total = confusion.sum(axis=(-2, -1)).astype(np.float64)
    return np.diagonal(confusion, axis1=-2, axis2=-1).sum(axis=-1) / np.where(total > 0, total, 1.0)


def _confusions(cells: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The confusion matrices of the first and the second model from (batches of) cell counts."""
    table = cells.reshape(*cells.shape[:-1], classes, classes, classes)
    return table.sum(axis=-1), table.sum(axis=-2)


def _resample(cells: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rows = int(cells.sum())
    rng = np.random.default_rng(seed)
    return rng.multinomial(rows, cells / rows, size=resamples)


def _interval(estimate: float, draws: np.ndarray, confidence: float, rows: int) -> Interval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(float(estimate), float(min(low, estimate)), float(max(high, estimate)), confidence,
                    float(draws.std(ddof=1)), rows)


def scored_classes(truth: np.ndarray, *predictions: np.ndarray, classes: int, all_classes: bool) -> list[int]:
    """Class indices a macro-F1 averages over: every known class, or (for a slice) those that occur."""
    known = range(classes - 1)  # the last index stands for "a label outside the known set"
    if all_classes:
        return list(known)
    present = set(np.unique(np.concatenate([truth, *predictions])).tolist())
    return [k for k in known if k in present] or list(known)


def paired_difference(truth: np.ndarray, first: np.ndarray, second: np.ndarray, classes: int, *,
                      confidence: float, resamples: int, seed: int, scored: Sequence[int]) -> Interval:
    """Paired bootstrap interval of ``macro-F1(first) - macro-F1(second)`` on the same rows.

    Args:
        truth, first, second: encoded labels (:func:`encode`) of the same rows, in the same order.
        classes: size of the encoding (known labels plus one for "unknown").
        scored: the class indices the macro average runs over.
    """
    cells = cell_counts(truth, first, second, classes)
    first_cm, second_cm = _confusions(cells, classes)
    estimate = macro_f1_of_counts(first_cm, scored) - macro_f1_of_counts(second_cm, scored)
    draws_first, draws_second = _confusions(_resample(cells, resamples, seed), classes)
    draws = macro_f1_of_counts(draws_first, scored) - macro_f1_of_counts(draws_second, scored)
    return _interval(estimate, draws, confidence, len(truth))


def metric_interval(truth: np.ndarray, predicted: np.ndarray, classes: int, *, metric: str, confidence: float,
                    resamples: int, seed: int, scored: Sequence[int]) -> Interval:
    """Bootstrap interval of one model's ``macro_f1`` or ``accuracy`` on its rows."""
    cells = cell_counts(truth, predicted, predicted, classes)
    confusion, _ = _confusions(cells, classes)
    draws_cm, _ = _confusions(_resample(cells, resamples, seed), classes)
    if metric == "macro_f1":
        return _interval(macro_f1_of_counts(confusion, scored), macro_f1_of_counts(draws_cm, scored), confidence,
                         len(truth))
    if metric == "accuracy":
        return _interval(accuracy_of_counts(confusion), accuracy_of_counts(draws_cm), confidence, len(truth))
    raise ValueError(f"unknown metric {metric!r} (macro_f1 or accuracy)")


def mcnemar(truth: np.ndarray, first: np.ndarray, second: np.ndarray, *, confidence: float) -> McNemar:
    """McNemar's exact test of paired accuracy, and an interval of ``accuracy(first) - accuracy(second)``.

    The interval is the exact conditional one: the share of discordant rows that favour ``first``
    gets a Clopper-Pearson interval, scaled by the discordant share of all rows.
    """
    rows = len(truth)
    first_right, second_right = first == truth, second == truth
    a_only = int(np.sum(first_right & ~second_right))
    b_only = int(np.sum(second_right & ~first_right))
    discordant = a_only + b_only
    estimate = (a_only - b_only) / rows if rows else 0.0
    if discordant == 0:
        return McNemar(a_only, b_only, 1.0, Interval(0.0, 0.0, 0.0, confidence, 0.0, rows))
    test = stats.binomtest(a_only, discordant, 0.5)
    share = test.proportion_ci(confidence_level=confidence, method="exact")
    scale = discordant / rows
    se = math.sqrt(max(discordant / rows - estimate**2, 0.0) / rows)
    difference = Interval(estimate, scale * (2 * share.low - 1), scale * (2 * share.high - 1), confidence, se, rows)
    return McNemar(a_only, b_only, float(test.pvalue), difference)


def rows_needed(interval: Interval, bound: float, planning: float, *, power: float = DECISION_POWER) -> int | None:
    """Rows at which an interval of this kind excludes ``bound`` with ``power`` when the truth is ``planning``.

    None when ``planning`` does not clear the bound (no number of rows shows a false claim) or when
    the spread is unknown.
    """
    distance = planning - bound
    if distance <= 0:
        return None
    spread = interval.se * math.sqrt(max(interval.rows, 1))
    if spread <= 0:
        return interval.rows
    z = stats.norm.ppf((1.0 + interval.confidence) / 2.0) + stats.norm.ppf(power)
    return max(1, math.ceil((z * spread / distance) ** 2))


def decide(interval: Interval, bound: float, *, planning: float | None = None) -> Verdict:
    """Whether the interval shows "quantity > bound" (see the module docstring for the three outcomes).

    Args:
        interval: the quantity's interval; ``interval.rows`` rows were scored.
        bound: the value the quantity must exceed.
        planning: the truth the row count is planned for; defaults to the estimate.
    """
    needed = rows_needed(interval, bound, interval.estimate if planning is None else planning)
    if interval.low > bound:
        return Verdict(PASSED, needed)
    if interval.high <= bound or needed is None or interval.rows >= needed:
        return Verdict(FAILED, needed)
    return Verdict(UNDECIDED, needed)
