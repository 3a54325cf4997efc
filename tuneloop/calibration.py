"""Calibration: expected calibration error, and temperature scaling fitted on the validation split.

Temperature scaling divides a model's logits by one number ``T`` before the softmax: the predicted
label never changes, only how confident the model says it is. ``T`` is fitted by minimising the
negative log-likelihood of the validation split (Guo et al., 2017). Log-probabilities differ from
logits by a per-row constant, so ``T`` is fitted on the probabilities a runtime returns.

The fitted ``T`` travels in the decision JSON (``calibration.temperature``); ``register`` writes it
into the registered model's ``tuneloop.json`` (:func:`calibrated_metadata`) and every runtime
(:func:`tuneloop.runtime.load_classifier`) applies it, so served ``confidence`` means what it says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

TEMPERATURE_KEY = "temperature"
"""Key of ``tuneloop.json`` holding the softmax temperature every runtime applies (absent: 1.0)."""
MIN_FIT_ROWS = 30
"""Fewer validation rows than this fit no temperature: it would follow the noise."""
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass
class CalibrationReport:
    """ECE of the test split before and after scaling, and the temperature fitted on validation."""

    temperature: float | None
    fitted_on_rows: int
    ece: float
    ece_calibrated: float | None
    bins: int
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, *, bins: int = 15) -> float:
    """Top-label ECE: the row-weighted mean |accuracy - confidence| over equal-width confidence bins.

    Args:
        probabilities: ``[rows, classes]`` softmax outputs.
        truth: true class indices; an index outside the columns counts as wrong.
    """
    if len(probabilities) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling (the softmax of ``log p / T``)."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``truth`` (known class indices)."""
    log_probabilities = np.log(np.clip(probabilities, 1e-12, 1.0))
    rows = np.arange(len(truth))

    def nll(log_temperature: float) -> float:
        logits = log_probabilities / np.exp(log_temperature)
        logits = logits - logits.max(axis=1, keepdims=True)
        log_normaliser = np.log(np.exp(logits).sum(axis=1))
        return float(-(logits[rows, truth] - log_normaliser).mean())

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def calibration_report(validation_probabilities: np.ndarray, validation_truth: np.ndarray,
                       test_probabilities: np.ndarray, test_truth: np.ndarray, *, fit: bool,
                       bins: int) -> CalibrationReport:
    """ECE on the test split, and (``fit``) the temperature fitted on validation with the ECE after it.

    Rows whose true label is not a known class are left out of the fit.
    """
    ece = expected_calibration_error(test_probabilities, test_truth, bins=bins)
    if not fit:
        return CalibrationReport(None, 0, ece, None, bins, "temperature scaling is off (evaluation.calibration)")
    known = validation_truth < validation_probabilities.shape[1]
    rows = int(known.sum())
    if rows < MIN_FIT_ROWS:
        return CalibrationReport(None, rows, ece, None, bins,
                                 f"no temperature fitted: {rows} validation rows, need {MIN_FIT_ROWS}")
    temperature = fit_temperature(validation_probabilities[known], validation_truth[known])
    calibrated = expected_calibration_error(scale(test_probabilities, temperature), test_truth, bins=bins)
    return CalibrationReport(round(temperature, 6), rows, ece, calibrated, bins)


def decision_temperature(decision: dict) -> float | None:
    """The temperature a gate decision fitted, or None."""
    value = (decision.get("calibration") or {}).get(TEMPERATURE_KEY)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def calibrated_metadata(metadata: dict, decision: dict) -> dict | None:
    """``tuneloop.json`` with the decision's temperature, or None when the decision fitted none."""
    temperature = decision_temperature(decision)
    if temperature is None:
        return None
    return {**metadata, TEMPERATURE_KEY: temperature,
            "confidence_calibration": {k: v for k, v in decision["calibration"].items() if k != TEMPERATURE_KEY}}


def metadata_temperature(metadata: dict, *, where: str = "tuneloop.json") -> float:
    """The temperature a model's metadata records (1.0 when none).

    Raises:
        ValueError: the recorded value is not a positive number.
    """
    value = metadata.get(TEMPERATURE_KEY, 1.0)
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not np.isfinite(value):
        raise ValueError(f"{where}: {TEMPERATURE_KEY} must be a positive number, got {value!r}")
    return float(value)


def label_indices(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """True labels as column indices of ``labels`` (unknown names get ``len(labels)``)."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(str(v), len(labels)) for v in values], dtype=np.int64)
