"""Sliced evaluation: which test rows form each slice, and each slice's metrics and gates.

Built-in slices come from the shared text statistics (:mod:`tuneloop.features.statistics`):
``length`` buckets of characters, ``has_url``, ``has_digits`` and ``has_phone_number``. Any other
column of the dataset, or of the texts source (its latest row per id), adds one slice per value.

Every slice is reported with its row count, accuracy and macro-F1 (with an interval), and against
the champion when there is one. A slice gates only when ``evaluation.slices.rules`` names it (or
``*``) *and* it holds at least ``evaluation.slices.min_rows`` test rows: a small slice is reported,
never gated on noise. A rule naming a slice that matches no rows is reported as such, not gated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tuneloop.config import SliceRuleConfig, TuneloopConfig
from tuneloop.errors import ConfigError
from tuneloop.features.statistics import text_statistics
from tuneloop.gate_checks import Check, interval_check
from tuneloop import gate_stats

LENGTH_BUCKETS = ((0, 50), (51, 200), (201, 1000), (1001, None))
"""Character-count buckets of the built-in ``length`` slices."""
MISSING_VALUE, OTHER_VALUES = "(missing)", "(other)"
EVERY_SLICE = "*"


@dataclass
class Slice:
    """A named set of test rows."""

    name: str
    rows: np.ndarray  # boolean mask over the test rows


@dataclass
class SliceResult:
    """One row of the slice table."""

    name: str
    rows: int
    accuracy: float | None = None
    macro_f1: float | None = None
    low: float | None = None
    high: float | None = None
    champion_macro_f1: float | None = None
    drop_points: float | None = None
    drop_low: float | None = None
    drop_high: float | None = None
    gated: bool = False
    note: str = ""
    checks: list[Check] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "checks"}


def define_slices(test: pd.DataFrame, config: TuneloopConfig) -> list[Slice]:
    """The slices of the test rows: built-in ones, then one per value of each configured column.

    Raises:
        ConfigError: a configured column is in neither the dataset nor the texts source.
    """
    settings = config.evaluation.slices
    slices = _builtin_slices(test, config) if settings.builtin else []
    for column in settings.columns:
        values = _column_values(test, column, config)
        slices += _value_slices(column, values, settings.max_values_per_column)
    return slices


def _builtin_slices(test: pd.DataFrame, config: TuneloopConfig) -> list[Slice]:
    wanted = ["char_count", "has_url", "digit_share", "has_phone_number"]
    statistics = test[wanted] if all(c in test.columns for c in wanted) else text_statistics(
        test[config.data.text_column])
    chars = statistics["char_count"].to_numpy()
    slices = []
    for low, high in LENGTH_BUCKETS:
        label = f"{low}-{high}" if high is not None else f"{low}+"
        slices.append(Slice(f"length={label} chars", (chars >= low) & ((chars <= high) if high is not None else True)))
    for name, flag in (("has_url", statistics["has_url"] > 0), ("has_digits", statistics["digit_share"] > 0),
                       ("has_phone_number", statistics["has_phone_number"] > 0)):
        flag = flag.to_numpy()
        slices += [Slice(f"{name}=yes", flag), Slice(f"{name}=no", ~flag)]
    return slices


def _column_values(test: pd.DataFrame, column: str, config: TuneloopConfig) -> pd.Series:
    if column in test.columns:
        return test[column]
    source = _texts_source(config)
    if column not in source.columns:
        raise ConfigError(
            f"evaluation.slices.columns: column {column!r} is in neither the dataset nor the texts source "
            f"{config.data.texts} (columns: {', '.join(map(str, sorted(set(test.columns) | set(source.columns))))})",
            field="evaluation.slices.columns", path=str(config.data.texts))
    data = config.data
    latest = source.sort_values(data.timestamp_column).drop_duplicates(data.id_column, keep="last")
    by_id = latest.set_index(latest[data.id_column].astype(str))[column]
    return test[data.id_column].astype(str).map(by_id)


def _texts_source(config: TuneloopConfig) -> pd.DataFrame:
    from tuneloop.datasets import read_table

    return read_table(config.data.texts, what="texts file")


def _value_slices(column: str, values: pd.Series, max_values: int) -> list[Slice]:
    text = values.map(lambda v: MISSING_VALUE if pd.isna(v) else str(v))
    counts = text.value_counts()
    kept = list(counts.index[:max_values])
    slices = [Slice(f"{column}={value}", (text == value).to_numpy()) for value in kept]
    rest = ~text.isin(kept)
    if rest.any():
        slices.append(Slice(f"{column}={OTHER_VALUES}", rest.to_numpy()))
    return slices


def _rule(name: str, rules: dict[str, SliceRuleConfig]) -> SliceRuleConfig | None:
    return rules.get(name) or rules.get(EVERY_SLICE)


def evaluate_slices(slices: list[Slice], truth: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None,
                    classes: int, config: TuneloopConfig) -> list[SliceResult]:
    """Per-slice metrics (encoded labels of the same test rows) and the checks the rules ask for."""
    settings, evaluation = config.evaluation.slices, config.evaluation
    results = []
    for offset, piece in enumerate(slices):
        rows = int(piece.rows.sum())
        rule = _rule(piece.name, settings.rules)
        if rows == 0:
            results.append(SliceResult(piece.name, 0, note="matches no test rows: reported, not gated"))
            continue
        result = _slice_metrics(piece, truth, challenger, champion, classes, evaluation, seed=evaluation.seed + offset)
        if rule is not None and (rule.min_macro_f1 is not None or rule.max_drop_vs_champion_points is not None):
            if rows < settings.min_rows:
                result.note = (f"{rows} rows < evaluation.slices.min_rows {settings.min_rows}: reported, "
                               f"not gated")
            else:
                result.gated = True
                result.checks = _slice_checks(piece, rule, truth, challenger, champion, classes, config,
                                              seed=evaluation.seed + offset)
        results.append(result)
    known = {piece.name for piece in slices}
    for name in sorted(set(settings.rules) - known - {EVERY_SLICE}):
        results.append(SliceResult(name, 0, note="no slice of this name matches any test row: reported, not gated"))
    return results


def _slice_metrics(piece: Slice, truth, challenger, champion, classes, evaluation, *, seed: int) -> SliceResult:
    t, c = truth[piece.rows], challenger[piece.rows]
    scored = gate_stats.scored_classes(t, c, classes=classes, all_classes=False)
    f1 = gate_stats.metric_interval(t, c, classes, metric="macro_f1", confidence=evaluation.confidence,
                                    resamples=evaluation.bootstrap_resamples, seed=seed, scored=scored)
    result = SliceResult(piece.name, int(piece.rows.sum()), accuracy=round(float(np.mean(t == c)), 4),
                         macro_f1=round(f1.estimate, 4), low=round(f1.low, 4), high=round(f1.high, 4))
    if champion is not None:
        k = champion[piece.rows]
        scored = gate_stats.scored_classes(t, c, k, classes=classes, all_classes=False)
        drop = gate_stats.paired_difference(t, k, c, classes, confidence=evaluation.confidence,
                                            resamples=evaluation.bootstrap_resamples, seed=seed,
                                            scored=scored).scaled(100.0)
        result.champion_macro_f1 = round(float(gate_stats.macro_f1_of_counts(
            np.bincount(t * classes + k, minlength=classes**2).reshape(classes, classes), scored)), 4)
        result.drop_points, result.drop_low, result.drop_high = (round(drop.estimate, 4), round(drop.low, 4),
                                                                 round(drop.high, 4))
    return result


def _slice_checks(piece: Slice, rule: SliceRuleConfig, truth, challenger, champion, classes, config, *,
                  seed: int) -> list[Check]:
    evaluation = config.evaluation
    t, c = truth[piece.rows], challenger[piece.rows]
    checks = []
    if rule.min_macro_f1 is not None:
        scored = gate_stats.scored_classes(t, c, classes=classes, all_classes=False)
        f1 = gate_stats.metric_interval(t, c, classes, metric="macro_f1", confidence=evaluation.confidence,
                                        resamples=evaluation.bootstrap_resamples, seed=seed, scored=scored)
        checks.append(interval_check(
            f"slice[{piece.name}]_macro_f1", f1, rule.min_macro_f1, gate_stats.decide(f1, rule.min_macro_f1),
            point_passed=f1.estimate >= rule.min_macro_f1, settings=evaluation,
            what=f"macro-F1 on slice {piece.name} exceeds {rule.min_macro_f1}"))
    if rule.max_drop_vs_champion_points is not None and champion is not None:
        k = champion[piece.rows]
        scored = gate_stats.scored_classes(t, c, k, classes=classes, all_classes=False)
        gain = gate_stats.paired_difference(t, c, k, classes, confidence=evaluation.confidence,
                                            resamples=evaluation.bootstrap_resamples, seed=seed, scored=scored)
        margin = rule.max_drop_vs_champion_points
        verdict = gate_stats.decide(gain.scaled(100.0), -margin, planning=0.0)
        drop = gain.scaled(-100.0)
        checks.append(interval_check(
            f"slice[{piece.name}]_macro_f1_drop_vs_champion_points", drop, margin, verdict,
            point_passed=drop.estimate <= margin, settings=evaluation,
            what=f"on slice {piece.name} the challenger trails the champion by less than {margin} macro-F1 points"))
    return checks
