"""The evaluation gate: metrics on the test split, thresholds, compression loss, champion comparison.

Writes the gate decision ``{"blessed": bool, "checks": [{"name", "value", "threshold", "passed"}]}``.
The gate fails closed: no thresholds, a champion that exists but cannot be scored (its files are
missing or corrupt), or any other error while deciding means *not blessed*. The first model of a
project has no champion to beat; that check then passes and says so.

An outage is not a verdict: when MLflow or the object store cannot be reached while fetching the
champion, :func:`run` raises :class:`~tuneloop.errors.ServiceUnavailableError` and writes no
decision, so KFP retries the step and no "model rejected" alert goes out.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import load_split
from tuneloop.metrics import classification_metrics, macro_f1
from tuneloop.registry import ChampionModel, as_outage, scrub
from tuneloop.runtime import load_classifier


@dataclass
class Check:
    """One line of the gate decision."""

    name: str
    value: float | str | None
    threshold: float | str | None
    passed: bool

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "passed": self.passed}


@dataclass
class EvaluationResult:
    """Test metrics of the compressed model and the gate decision."""

    blessed: bool
    checks: list[Check]
    metrics: dict = field(default_factory=dict)
    champion_version: str | None = None

    def decision(self) -> dict:
        """The gate decision JSON (the contract between evaluate and register)."""
        return {
            "blessed": self.blessed,
            "checks": [check.as_dict() for check in self.checks],
            "test_metrics": {k: self.metrics[k] for k in ("accuracy", "macro_f1", "rows") if k in self.metrics},
            "champion_version": self.champion_version,
        }


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
        config: thresholds live in ``config.evaluation``.
        dataset_path: the Dataset artifact.
        model_dir: the uncompressed Model (scored to measure what compression cost).
        compressed_dir: the Compressed Model under test.
        decision_path: where the gate decision JSON is written.
        find_champion: returns the champion or None when there is none; defaults to the registry.

    Returns:
        The result; ``blessed`` is False for a failed check *and* for any error while deciding.

    Raises:
        ServiceUnavailableError: a service (MLflow, the object store) stayed unreachable; nothing
            is written, the step is to be retried.
    """
    if find_champion is None:
        from tuneloop.registry import download_champion

        find_champion = download_champion
    try:
        result = _evaluate(config, dataset_path, model_dir, compressed_dir, find_champion)
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


def _evaluate(config, dataset_path, model_dir, compressed_dir, find_champion) -> EvaluationResult:
    test = load_split(dataset_path, "test")
    texts = test[config.data.text_column].fillna("").astype(str).tolist()
    truth = test[config.data.label_column].astype(str).tolist()
    classes = config.data.classes
    print(f"evaluate: scoring the compressed model on {len(texts)} test rows", flush=True)
    candidate = load_classifier(compressed_dir)
    metrics = classification_metrics(truth, candidate.predict(texts), classes)
    checks = threshold_checks(metrics, config.evaluation.thresholds)
    print("evaluate: scoring the uncompressed model for the compression check", flush=True)
    uncompressed_f1 = macro_f1(truth, load_classifier(model_dir).predict(texts), classes)
    metrics["uncompressed_macro_f1"] = uncompressed_f1
    checks.append(compression_check(metrics["macro_f1"], uncompressed_f1, config.evaluation.max_compression_loss_points))
    champion_version = None
    if config.evaluation.compare_to_champion:
        check, champion_version = _champion_check(config, texts, truth, metrics["macro_f1"], find_champion)
        checks.append(check)
    blessed = bool(checks) and all(check.passed for check in checks)
    return EvaluationResult(blessed, checks, metrics, champion_version)


def threshold_checks(metrics: dict, thresholds: dict[str, float]) -> list[Check]:
    """One check per configured threshold; no thresholds at all is itself a failed check."""
    if not thresholds:
        return [Check("thresholds_configured", "none", "at least one", False)]
    return [
        Check(f"test_{name}", round(metrics[name], 6), threshold, metrics[name] >= threshold)
        for name, threshold in sorted(thresholds.items())
    ]


def compression_check(compressed_f1: float, uncompressed_f1: float, budget_points: float) -> Check:
    """Compression may cost at most ``budget_points`` of test macro-F1."""
    loss_points = round(100.0 * (uncompressed_f1 - compressed_f1), 4)
    return Check("compression_macro_f1_loss_points", loss_points, budget_points, loss_points <= budget_points)


def champion_check(challenger_f1: float, champion_f1: float, max_drop_points: float) -> Check:
    """The challenger may trail the champion by at most ``max_drop_points`` of test macro-F1."""
    drop_points = round(100.0 * (champion_f1 - challenger_f1), 4)
    return Check("macro_f1_drop_vs_champion_points", drop_points, max_drop_points, drop_points <= max_drop_points)


def _champion_check(config, texts, truth, challenger_f1, find_champion) -> tuple[Check, str | None]:
    with tempfile.TemporaryDirectory(prefix="tuneloop-champion-") as scratch:
        champion = find_champion(config, Path(scratch))
        if champion is None:
            print("evaluate: no champion registered yet; this is the first model", flush=True)
            return Check("champion_comparison", "no champion yet (first model)", None, True), None
        print(f"evaluate: scoring champion version {champion.version} on the same test rows", flush=True)
        champion_model = load_classifier(champion.directory)
        if list(champion_model.labels) != list(config.data.classes):
            return Check("champion_labels_match", str(champion_model.labels), str(config.data.classes), False), champion.version
        champion_f1 = macro_f1(truth, champion_model.predict(texts), config.data.classes)
    check = champion_check(challenger_f1, champion_f1, config.evaluation.max_drop_vs_champion_points)
    return check, champion.version


def _write_decision(decision_path: str | Path, result: EvaluationResult) -> None:
    path = Path(decision_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.decision(), indent=2), encoding="utf-8")


def _print_checks(result: EvaluationResult) -> None:
    for check in result.checks:
        mark = "pass" if check.passed else "FAIL"
        print(f"evaluate: [{mark}] {check.name}: {check.value} (threshold {check.threshold})", flush=True)
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
