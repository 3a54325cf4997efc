"""The `evaluate` component: test metrics and the fail-closed gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    dataset: Input[Dataset],
    model: Input[Model],
    compressed: Input[Model],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    decision: Output[Artifact],
) -> NamedTuple("EvaluationOutputs", blessed=bool):
    """Score the compressed model on the test split and decide whether it is blessed.

    Checks, each decided on an interval at ``evaluation.confidence`` (paired bootstrap; McNemar for
    accuracy): optional absolute thresholds, the macro-F1 compression cost against the uncompressed
    model, the drop against the current champion on the same test rows (non-inferiority) or, for the
    first model, the gain over a TF-IDF + logistic regression baseline, and optional per-slice gates.
    A check the test set is too small to decide follows ``evaluation.when_undecided``. Every check's
    value and interval (``<check>``, ``<check>_low``, ``<check>_high``), the slice table and the
    expected calibration error are logged as metrics. Fails closed: nothing to decide on, a champion
    that cannot be scored, or any other error while deciding means not blessed. An outage is not a
    verdict: when MLflow or the object store cannot be reached the step fails with a retryable error
    (no decision, no "model rejected" alert) and KFP retries it.
    """
    from collections import namedtuple

    from tuneloop import evaluation
    from tuneloop.config import TuneloopConfig

    config = TuneloopConfig.from_json(config_json)
    result = evaluation.run(config, dataset.path, model.path, compressed.path, decision.path)
    for name in ("accuracy", "macro_f1", "uncompressed_macro_f1"):
        if name in result.metrics:
            metrics.log_metric(f"test_{name}", result.metrics[name])
    for label, scores in result.metrics.get("per_class", {}).items():
        metrics.log_metric(f"test_precision_{label}", scores["precision"])
        metrics.log_metric(f"test_recall_{label}", scores["recall"])
    for name, value in evaluation.metric_values(result).items():
        metrics.log_metric(name, value)
    if "confusion_matrix" in result.metrics:
        classification.log_confusion_matrix(result.metrics["labels"], result.metrics["confusion_matrix"])
    return namedtuple("EvaluationOutputs", ["blessed"])(result.blessed)
