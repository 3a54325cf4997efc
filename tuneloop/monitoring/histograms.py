"""Per-column drift over the whole window, from the value counts DuckDB aggregated (:mod:`.scan`).

For each statistic column and the predicted label, three scores compare the reference with the
whole window, on the bins Evidently uses: a numerical column with more than 20 distinct reference
values is cut into Sturges bins over the combined range of reference and window (what
``numpy.histogram_bin_edges(..., "sturges")`` gives for that range and row count), any other column
into its distinct values.

- ``jensenshannon``: Jensen-Shannon distance of the binned shares (``scipy.spatial.distance``);
- ``psi``: population stability index of the binned shares, empty bins filled as Evidently fills them;
- ``wasserstein``: first Wasserstein distance over the exact values (the counts are exact), normed by
  the reference's standard deviation (numerical columns only).

The column's drift decision is taken here, on the whole window, when Evidently's method for it is
one of these three (its default for references over 1000 rows and for the predicted label, or what
``monitoring.stattest`` sets), with Evidently's threshold; otherwise (p-value tests on small
references) Evidently's verdict on the sample stands.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tuneloop.monitoring.common import CATEGORICAL_STATISTICS, NUMERICAL_STATISTICS

WINDOW_METHODS = {
    "Wasserstein distance (normed)": "wasserstein", "wasserstein": "wasserstein",
    "Jensen-Shannon distance": "jensenshannon", "jensenshannon": "jensenshannon",
    "PSI": "psi", "psi": "psi",
}
"""Evidently's method names (display or registry name) that the whole-window tier computes."""
DISTINCT_FOR_BINS = 20
"""Evidently bins a numerical column with more distinct reference values; fewer are categories."""


def _sturges_edges(low: float, high: float, rows: int) -> np.ndarray:
    """``numpy.histogram_bin_edges(data, "sturges")`` for data of this range and size."""
    if high <= low:
        return np.array([low - 0.5, low + 0.5])
    width = (high - low) / (np.log2(rows) + 1.0)
    bins = max(int(np.ceil((high - low) / width)), 1)
    return np.linspace(low, high, bins + 1)


def binned_shares(reference: pd.Series, counts: pd.Series, numerical: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference and window shares per bin (Evidently's binning, see the module docstring)."""
    reference = reference.dropna()
    counts = counts[counts > 0]
    total = float(counts.sum())
    if numerical and reference.nunique() > DISTINCT_FOR_BINS:
        values = counts.index.to_numpy(dtype=float)
        low = float(min(reference.min(), values.min()))
        high = float(max(reference.max(), values.max()))
        edges = _sturges_edges(low, high, len(reference) + int(total))
        reference_shares = np.histogram(reference.to_numpy(dtype=float), edges)[0] / len(reference)
        current_shares = np.histogram(values, edges, weights=counts.to_numpy(dtype=float))[0] / total
        return reference_shares, current_shares
    keys = list(dict.fromkeys([*counts.index.tolist(), *reference.unique().tolist()]))
    reference_counts = reference.value_counts()
    reference_shares = np.array([reference_counts.get(key, 0) for key in keys], dtype=float) / len(reference)
    current_shares = np.array([counts.get(key, 0) for key in keys], dtype=float) / total
    return reference_shares, current_shares


def _fill_zeroes(shares: np.ndarray) -> np.ndarray:
    shares = shares.copy()
    smallest = shares[shares != 0].min()
    shares[shares == 0] = smallest / 10**6 if smallest <= 0.0001 else 0.0001
    return shares


def jensenshannon(reference_shares: np.ndarray, current_shares: np.ndarray) -> float:
    from scipy.spatial import distance

    return float(distance.jensenshannon(reference_shares, current_shares))


def psi(reference_shares: np.ndarray, current_shares: np.ndarray) -> float:
    reference_shares, current_shares = _fill_zeroes(reference_shares), _fill_zeroes(current_shares)
    return float(np.sum((reference_shares - current_shares) * np.log(reference_shares / current_shares)))


def wasserstein(reference: pd.Series, counts: pd.Series) -> float:
    """Wasserstein distance between the reference values and the window's exact value counts,
    normed by the reference's standard deviation (Evidently's ``wasserstein``)."""
    from scipy.stats import wasserstein_distance

    reference = reference.dropna().to_numpy(dtype=float)
    counts = counts[counts > 0]
    distance = wasserstein_distance(reference, counts.index.to_numpy(dtype=float),
                                    v_weights=counts.to_numpy(dtype=float))
    return float(distance / max(float(np.std(reference)), 0.001))


def column_scores(column: str, reference: pd.Series, counts: pd.Series) -> dict[str, float]:
    """The three whole-window scores of one column (``wasserstein`` only for numerical columns)."""
    numerical = column in NUMERICAL_STATISTICS
    reference_shares, current_shares = binned_shares(reference, counts, numerical)
    scores = {"jensenshannon": jensenshannon(reference_shares, current_shares),
              "psi": psi(reference_shares, current_shares)}
    if numerical:
        scores["wasserstein"] = wasserstein(reference, counts)
    return scores


def apply_window_tier(columns: list[dict], reference: pd.DataFrame, value_counts: dict[str, pd.Series],
                      window_rows: int) -> list[dict]:
    """The column results with the whole-window scores added, and the drift decision taken on the whole
    window wherever Evidently's method is one the window tier computes (see the module docstring).

    Each result gains ``window_scores`` and ``tier`` (``window`` or ``sample``); a column decided on
    the window also keeps Evidently's own sample score under ``sample_score``/``sample_drifted``.
    """
    results = []
    for column in columns:
        name = column["column"]
        column = {**column, "tier": "sample"}
        counts = value_counts.get(name)
        if counts is None or counts.sum() == 0 or name not in reference.columns:
            results.append(column)
            continue
        values = reference[name]
        if name not in NUMERICAL_STATISTICS and name not in CATEGORICAL_STATISTICS:  # the predicted label
            values, counts = values.astype(str), counts.rename(index=str)
        scores = column_scores(name, values, counts)
        column["window_scores"] = scores
        column["window_rows"] = int(window_rows)
        method = WINDOW_METHODS.get(str(column.get("method")))
        if method in scores and column.get("threshold") is not None:
            column.update(sample_score=column["score"], sample_drifted=column["drifted"], tier="window",
                          score=scores[method], drifted=bool(scores[method] >= float(column["threshold"])))
        results.append(column)
    return results
