"""The evaluation gate: test metrics, slices, calibration, and comparisons decided with uncertainty.

Writes the gate decision ``{"blessed": bool, "checks": [{"name", "value", "threshold", "passed",
"low", "high", "confidence", "status", ...}], "slices": [...], "calibration": {...}}``. Every
comparison is paired on the same test rows and decided on an interval at
``evaluation.confidence`` (:mod:`tuneloop.gate_stats`):

- ``macro_f1_drop_vs_champion_points``: the challenger may trail the champion by at most
  ``max_drop_vs_champion_points`` (non-inferiority, paired bootstrap); accuracy is reported with
  McNemar's exact test;
- ``macro_f1_gain_vs_baseline_points``: without a champion, the first model must beat TF-IDF +
  logistic regression trained on the same split by ``baseline_margin_points``;
- ``compression_macro_f1_loss_points``: compression may cost at most ``max_compression_loss_points``
  (decided on its point value with its interval shown: the variant was chosen within this budget);
- ``test_<metric>``: optional absolute thresholds; ``slice[...]``: optional per-slice gates.

A check the test set is too small to decide says so with the rows it would need, and follows
``evaluation.when_undecided``. The gate fails closed: nothing to decide on, a champion that exists
but cannot be scored (files missing or corrupt, other labels, other rows), or any other error while
deciding means *not blessed*.

An outage is not a verdict: when MLflow or the object store cannot be reached while fetching the
champion, :func:`run` raises :class:`~tuneloop.errors.ServiceUnavailableError` and writes no
decision, so KFP retries the step and no "model rejected" alert goes out. A slice column that does
not exist is a configuration error (:class:`~tuneloop.errors.ConfigError`), raised before scoring.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tuneloop import gate_stats
from tuneloop.calibration import calibration_report
from tuneloop.artifacts import read_metadata
from tuneloop.config import TuneloopConfig
from tuneloop.datasets import load_split
from tuneloop.dp import epsilon_check
from tuneloop.errors import ConfigError, GateError
from tuneloop.gate_checks import Check, interval_check, reported_check
from tuneloop.metrics import classification_metrics
from tuneloop.registry import ChampionModel, as_outage, scrub
from tuneloop.runtime import load_classifier
from tuneloop.slices import SliceResult, define_slices, evaluate_slices

__all__ = ["Check", "EvaluationResult", "ScoredRows", "run", "read_decision", "pair_rows", "metric_values"]


@dataclass
class EvaluationResult:
    """Test metrics of the compressed model and the gate decision."""

    blessed: bool
    checks: list[Check]
    metrics: dict = field(default_factory=dict)
    champion_version: str | None = None
    slices: list[SliceResult] = field(default_factory=list)
    calibration: dict | None = None

    def decision(self) -> dict:
        """The gate decision JSON (the contract between evaluate and register)."""
        return {
            "blessed": self.blessed,
            "checks": [check.as_dict() for check in self.checks],
            "test_metrics": {k: self.metrics[k] for k in ("accuracy", "macro_f1", "rows") if k in self.metrics},
            "champion_version": self.champion_version,
            "slices": [piece.as_dict() for piece in self.slices],
            "calibration": self.calibration,
        }


@dataclass
class ScoredRows:
    """Predictions of one model, keyed by the test rows (entity ids) they were made on."""

    who: str
    ids: list[str]
    predictions: list[str]


ChampionLookup = Callable[[TuneloopConfig, Path], "ChampionModel | None"]


def run(
    config: TuneloopConfig,
    dataset_path: str | Path,
    model_dir: str | Path,
    compressed_dir: str | Path,
    decision_path: str | Path,
    *,
    find_champion: ChampionLookup | None = None,
) -> EvaluationResult:
    """Score the compressed model on the test split, apply the gate, write the decision JSON.

    Args:
        config: the gate's settings live in ``config.evaluation``.
        dataset_path: the Dataset artifact.
        model_dir: the uncompressed Model (scored to measure what compression cost).
        compressed_dir: the Compressed Model under test.
        decision_path: where the gate decision JSON is written.
        find_champion: returns the champion or None when there is none; defaults to the registry.

    Returns:
        The result; ``blessed`` is False for a failed or undecided check *and* for any error while deciding.

    Raises:
        ServiceUnavailableError: a service (MLflow, the object store) stayed unreachable; nothing
            is written, the step is to be retried.
        ConfigError: ``evaluation.slices`` names a column that does not exist; nothing is written.
    """
    if find_champion is None:
        from tuneloop.registry import download_champion

        find_champion = download_champion
    try:
        result = _evaluate(config, dataset_path, model_dir, compressed_dir, find_champion)
    except ConfigError as error:
        print(f"evaluate: {error}", flush=True)
        raise
    except Exception as error:
        outage = as_outage(config, error, "fetching the champion")
        if outage is not None:
            print(f"evaluate: {outage}; no decision written, the step is to be retried", flush=True)
            if outage is error:
                raise
            raise outage from error
        reason = scrub(f"{type(error).__name__}: {error}")
        print(f"evaluate: the gate could not decide ({reason}); not blessed", flush=True)
        result = EvaluationResult(False, [Check("gate_error", reason, None, False)])
    _write_decision(decision_path, result)
    _print_checks(result)
    return result


@dataclass
class _TestRows:
    """The test split, encoded once: entity ids, texts, true labels as indices."""

    ids: list[str]
    texts: list[str]
    truth_names: list[str]
    truth: np.ndarray
    classes: int  # size of the encoding: the known labels plus one for "unknown"


def _evaluate(config, dataset_path, model_dir, compressed_dir, find_champion) -> EvaluationResult:
    test = load_split(dataset_path, "test")
    slices = define_slices(test, config)  # a bad slice column fails before anything is scored
    rows = _test_rows(test, config)
    print(f"evaluate: scoring the compressed model on {len(rows.texts)} test rows", flush=True)
    candidate = load_classifier(compressed_dir)
    probabilities = _uncalibrated_probabilities(candidate, rows.texts)
    predicted = [candidate.labels[i] for i in probabilities.argmax(axis=1)]
    challenger = ScoredRows("the challenger", rows.ids, predicted)
    metrics = classification_metrics(rows.truth_names, predicted, config.data.classes)
    encoded = gate_stats.encode(predicted, config.data.classes)
    checks = threshold_checks(rows, encoded, config)
    print("evaluate: scoring the uncompressed model for the compression check", flush=True)
    uncompressed = ScoredRows("the uncompressed model", rows.ids, load_classifier(model_dir).predict(rows.texts))
    checks.append(compression_check(rows, challenger, uncompressed, config, metrics))
    if config.privacy.max_epsilon is not None:  # only a DP-SGD model within the budget (no record: fails closed)
        checks.append(Check(**epsilon_check(read_metadata(model_dir), config.privacy.max_epsilon)))
    comparison_checks, champion_version, champion_encoded = _reference_checks(config, dataset_path, rows,
                                                                              challenger, find_champion)
    checks += comparison_checks
    slice_results = evaluate_slices(slices, rows.truth, encoded, champion_encoded, rows.classes, config)
    checks += [check for piece in slice_results for check in piece.checks]
    checks += _nothing_to_decide_on(checks)
    calibration = _calibration(config, dataset_path, candidate, probabilities, rows)
    metrics["calibration"] = calibration
    blessed = bool(checks) and all(check.passed for check in checks)
    return EvaluationResult(blessed, checks, metrics, champion_version, slice_results, calibration)


def _test_rows(test, config: TuneloopConfig) -> _TestRows:
    data = config.data
    texts = test[data.text_column].fillna("").astype(str).tolist()
    truth = test[data.label_column].astype(str).tolist()
    ids = test[data.id_column].astype(str).tolist() if data.id_column in test.columns else \
        [str(i) for i in range(len(test))]
    return _TestRows(ids, texts, truth, gate_stats.encode(truth, data.classes), len(data.classes) + 1)


def _uncalibrated_probabilities(classifier, texts: Sequence[str]) -> np.ndarray:
    """Probabilities without any recorded temperature: the gate fits its own on validation."""
    if hasattr(classifier, "temperature"):
        classifier.temperature = 1.0
    return np.asarray(classifier.predict_proba(texts), dtype=np.float64)


def pair_rows(challenger: ScoredRows, reference: ScoredRows, config: TuneloopConfig) -> np.ndarray:
    """The reference's predictions, encoded, in the challenger's row order; refuses other rows.

    Raises:
        GateError: the reference was scored on other test rows (a paired comparison would be wrong).
    """
    if len(reference.ids) != len(reference.predictions):
        raise GateError(f"{reference.who} returned {len(reference.predictions)} predictions for "
                        f"{len(reference.ids)} test rows: refusing to compare", stage="evaluation")
    if list(reference.ids) != list(challenger.ids):
        only_reference = sorted(set(reference.ids) - set(challenger.ids))
        only_challenger = sorted(set(challenger.ids) - set(reference.ids))
        if only_reference or only_challenger or len(reference.ids) != len(challenger.ids):
            raise GateError(
                f"{reference.who} was scored on {len(reference.ids)} test rows, {challenger.who} on "
                f"{len(challenger.ids)}; {len(only_reference)} ids only on the first side "
                f"{only_reference[:3]}, {len(only_challenger)} only on the second {only_challenger[:3]}: "
                f"refusing to compare models on different rows", stage="evaluation", field="test rows")
        by_id = dict(zip(reference.ids, reference.predictions))
        return gate_stats.encode([by_id[i] for i in challenger.ids], config.data.classes)
    return gate_stats.encode(reference.predictions, config.data.classes)


def threshold_checks(rows: _TestRows, predicted: np.ndarray, config: TuneloopConfig) -> list[Check]:
    """One check per configured absolute threshold (optional), decided on the metric's interval."""
    settings = config.evaluation
    checks = []
    scored = list(range(len(config.data.classes)))
    for offset, (name, threshold) in enumerate(sorted(settings.thresholds.items())):
        interval = gate_stats.metric_interval(rows.truth, predicted, rows.classes, metric=name,
                                              confidence=settings.confidence, resamples=settings.bootstrap_resamples,
                                              seed=settings.seed + 1000 + offset, scored=scored)
        checks.append(interval_check(f"test_{name}", interval, threshold, gate_stats.decide(interval, threshold),
                                     point_passed=interval.estimate >= threshold, settings=settings,
                                     what=f"test {name} exceeds {threshold}"))
    return checks


def _gain_points(rows: _TestRows, first: np.ndarray, second: np.ndarray, config: TuneloopConfig,
                 seed: int) -> gate_stats.Interval:
    settings = config.evaluation
    return gate_stats.paired_difference(rows.truth, first, second, rows.classes, confidence=settings.confidence,
                                        resamples=settings.bootstrap_resamples, seed=seed,
                                        scored=list(range(len(config.data.classes)))).scaled(100.0)


def compression_check(rows: _TestRows, compressed: ScoredRows, uncompressed: ScoredRows, config: TuneloopConfig,
                      metrics: dict) -> Check:
    """Compression may cost at most ``max_compression_loss_points`` of test macro-F1 (paired interval)."""
    budget = config.evaluation.max_compression_loss_points
    first = gate_stats.encode(compressed.predictions, config.data.classes)
    gain = _gain_points(rows, first, pair_rows(compressed, uncompressed, config), config, config.evaluation.seed + 1)
    metrics["uncompressed_macro_f1"] = round(metrics["macro_f1"] - gain.estimate / 100.0, 6)
    loss = gain.scaled(-1.0)
    # Decided on its point value, interval shown: compression picked this variant within the same budget
    # on validation, and the two models disagree on so few rows that an interval over a budget of ~1 point
    # would leave nearly every compressed model undecided on a test set of a few hundred rows.
    passed = loss.estimate <= budget
    return Check("compression_macro_f1_loss_points", round(loss.estimate, 4), budget, passed, round(loss.low, 4),
                 round(loss.high, 4), loss.confidence, rows=loss.rows,
                 note=f"decided on the point value (interval shown): compression {'costs' if passed else 'costs more than'} "
                      f"{'at most ' if passed else ''}{budget} macro-F1 points on these rows")


def _reference_checks(config, dataset_path, rows, challenger, find_champion):
    """Checks against the champion, or against the baseline when there is none (or no comparison is asked)."""
    champion = None
    with tempfile.TemporaryDirectory(prefix="tuneloop-champion-") as scratch:
        if config.evaluation.compare_to_champion:
            champion = find_champion(config, Path(scratch))
            if champion is None:
                print("evaluate: no champion registered yet; this is the first model", flush=True)
        if champion is not None:
            checks, encoded = _champion_checks(config, rows, challenger, champion)
            return checks, champion.version, encoded
    if config.evaluation.baseline:
        return _baseline_checks(config, dataset_path, rows, challenger), None, None
    note = "no champion yet (first model)" if config.evaluation.compare_to_champion else "not compared"
    return [Check("champion_comparison", note, None, True, status="reported",
                  note="evaluation.baseline is off: the first model is compared with nothing")], None, None


def _champion_checks(config, rows, challenger, champion: ChampionModel) -> tuple[list[Check], np.ndarray | None]:
    print(f"evaluate: scoring champion version {champion.version} on the same test rows", flush=True)
    model = load_classifier(champion.directory)
    if list(model.labels) != list(config.data.classes):
        return [Check("champion_labels_match", str(model.labels), str(config.data.classes), False)], None
    reference = ScoredRows(f"champion version {champion.version}", rows.ids, model.predict(rows.texts))
    champion_encoded = pair_rows(challenger, reference, config)
    challenger_encoded = gate_stats.encode(challenger.predictions, config.data.classes)
    margin = config.evaluation.max_drop_vs_champion_points
    gain = _gain_points(rows, challenger_encoded, champion_encoded, config, config.evaluation.seed + 2)
    drop = gain.scaled(-1.0)
    drop_check = interval_check(
        "macro_f1_drop_vs_champion_points", drop, margin, gate_stats.decide(gain, -margin, planning=0.0),
        point_passed=drop.estimate <= margin, settings=config.evaluation,
        what=f"the challenger trails champion version {champion.version} by less than {margin} macro-F1 points")
    return [drop_check, _accuracy_check("accuracy_vs_champion_points", rows, challenger_encoded, champion_encoded,
                                        config, f"champion version {champion.version}")], champion_encoded


def _baseline_checks(config, dataset_path, rows, challenger) -> list[Check]:
    from tuneloop import baseline

    train = baseline.train_rows(load_split(dataset_path, "train"), config)
    data = config.data
    print(f"evaluate: no champion to beat; training the TF-IDF + logistic regression baseline on {len(train)} "
          f"train rows", flush=True)
    predictions = baseline.fit_predict(train[data.text_column].fillna("").astype(str).tolist(),
                                       train[data.label_column].astype(str).tolist(), rows.texts,
                                       seed=config.evaluation.seed)
    reference = ScoredRows("the TF-IDF + logistic regression baseline", rows.ids, predictions)
    baseline_encoded = pair_rows(challenger, reference, config)
    challenger_encoded = gate_stats.encode(challenger.predictions, config.data.classes)
    margin = config.evaluation.baseline_margin_points
    gain = _gain_points(rows, challenger_encoded, baseline_encoded, config, config.evaluation.seed + 3)
    baseline_f1 = classification_metrics(rows.truth_names, predictions, data.classes)["macro_f1"]
    check = interval_check(
        "macro_f1_gain_vs_baseline_points", gain, margin, gate_stats.decide(gain, margin),
        point_passed=gain.estimate > margin, settings=config.evaluation,
        what=f"the model beats the TF-IDF + logistic regression baseline (test macro-F1 {baseline_f1:.4f}) "
             f"by more than {margin} macro-F1 points")
    return [check, _accuracy_check("accuracy_vs_baseline_points", rows, challenger_encoded, baseline_encoded, config,
                                   "the baseline")]


def _accuracy_check(name: str, rows, challenger: np.ndarray, reference: np.ndarray, config, who: str) -> Check:
    test = gate_stats.mcnemar(rows.truth, challenger, reference, confidence=config.evaluation.confidence)
    return reported_check(name, test.difference.scaled(100.0),
                          f"accuracy difference against {who} (reported, not gated): McNemar's exact test "
                          f"p={test.p_value:.4g} ({test.a_only} rows only the challenger got right, "
                          f"{test.b_only} only {who})")


def _nothing_to_decide_on(checks: list[Check]) -> list[Check]:
    """Fail closed when no gated check speaks to quality (compression cost alone says nothing)."""
    deciding = [c for c in checks if c.gated and c.name != "compression_macro_f1_loss_points"]
    if deciding:
        return []
    return [Check("quality_bar_configured", "none", "thresholds, the champion or the baseline", False,
                  note="nothing to decide quality on: set evaluation.thresholds or evaluation.baseline")]


def _calibration(config, dataset_path, candidate, test_probabilities: np.ndarray, rows: _TestRows) -> dict:
    settings = config.evaluation
    validation_probabilities = np.zeros((0, test_probabilities.shape[1]))
    validation_truth = np.zeros(0, dtype=np.int64)
    validation = _validation_split(dataset_path) if settings.calibration else None
    if validation is not None:
        print(f"evaluate: fitting temperature scaling on {len(validation)} validation rows", flush=True)
        validation_probabilities = _uncalibrated_probabilities(
            candidate, validation[config.data.text_column].fillna("").astype(str).tolist())
        validation_truth = gate_stats.encode(validation[config.data.label_column].astype(str).tolist(),
                                             candidate.labels)
    report = calibration_report(validation_probabilities, validation_truth, test_probabilities,
                                gate_stats.encode(rows.truth_names, candidate.labels), fit=settings.calibration,
                                bins=settings.calibration_bins)
    return report.as_dict()


def _validation_split(dataset_path):
    """The validation rows, or None when the dataset holds none (then no temperature is fitted)."""
    from tuneloop.errors import DataError

    try:
        return load_split(dataset_path, "validation")
    except DataError as error:
        if "has no rows in split" not in str(error):
            raise
        return None


def metric_values(result: EvaluationResult) -> dict[str, float]:
    """Numbers for KFP ``Metrics``: each check's value and interval, each slice's, and calibration.

    Names keep to letters, digits and ``_`` (slice names are sanitised), so every UI shows them.
    """
    values: dict[str, float] = {}
    for check in result.checks:
        if isinstance(check.value, (int, float)) and not isinstance(check.value, bool):
            key = _metric_name(f"gate_{check.name}")
            values[key] = float(check.value)
            if check.low is not None and check.high is not None:
                values[f"{key}_low"], values[f"{key}_high"] = float(check.low), float(check.high)
    for piece in result.slices:
        key = _metric_name(f"slice_{piece.name}")
        values[f"{key}_rows"] = float(piece.rows)
        if piece.macro_f1 is not None:
            values[f"{key}_macro_f1"] = float(piece.macro_f1)
            values[f"{key}_macro_f1_low"], values[f"{key}_macro_f1_high"] = float(piece.low), float(piece.high)
    for name in ("ece", "ece_calibrated", "temperature"):
        value = (result.calibration or {}).get(name)
        if isinstance(value, (int, float)):
            values[f"test_{name}" if name != "temperature" else name] = float(value)
    return values


def _metric_name(text: str) -> str:
    import re

    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", text)).strip("_")


def _write_decision(decision_path: str | Path, result: EvaluationResult) -> None:
    path = Path(decision_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.decision(), indent=2), encoding="utf-8")


def _print_checks(result: EvaluationResult) -> None:
    for check in result.checks:
        mark = {"passed": "pass", "reported": "info", "undecided": "UNDECIDED"}.get(check.status, "FAIL")
        if check.status == "undecided" and check.passed:
            mark = "pass*"
        interval = f" [{check.low}, {check.high}]" if check.low is not None else ""
        print(f"evaluate: [{mark}] {check.name}: {check.value}{interval} (threshold {check.threshold})"
              f"{'; ' + check.note if check.note else ''}", flush=True)
    calibration = result.calibration or {}
    if calibration:
        print(f"evaluate: calibration: ECE {calibration.get('ece'):.4f}, temperature {calibration.get('temperature')}"
              f", ECE after {calibration.get('ece_calibrated')}", flush=True)
    print(f"evaluate: blessed = {result.blessed}", flush=True)


def read_decision(decision_path: str | Path) -> dict:
    """Read a gate decision; a missing or malformed file reads as *not blessed* (fail closed)."""
    try:
        decision = json.loads(Path(decision_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return {"blessed": False, "checks": [{"name": "decision_readable", "value": str(error),
                                              "threshold": None, "passed": False}]}
    if not isinstance(decision, dict) or decision.get("blessed") is not True:
        decision = decision if isinstance(decision, dict) else {}
        decision["blessed"] = False
    return decision
