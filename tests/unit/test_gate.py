"""The gate's statistics, calibration carried to every runtime, and the baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import export_compressed_fp32, make_config
from tuneloop import baseline, calibration, gate_stats
from tuneloop.errors import ModelError
from tuneloop.metrics import macro_f1

LABELS = ["a", "b", "c"]


def random_pair(rows: int, seed: int, error: float = 0.2):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, rows)
    first = np.where(rng.random(rows) < error, rng.integers(0, 3, rows), truth)
    second = np.where(rng.random(rows) < error, rng.integers(0, 3, rows), truth)
    return truth, first, second


def test_paired_difference_estimate_is_the_difference_of_scikit_learn_macro_f1():
    truth, first, second = random_pair(500, 0)
    interval = gate_stats.paired_difference(truth, first, second, 4, confidence=0.95, resamples=500, seed=1,
                                            scored=[0, 1, 2])
    names = lambda codes: [LABELS[i] for i in codes]  # noqa: E731
    expected = macro_f1(names(truth), names(first), LABELS) - macro_f1(names(truth), names(second), LABELS)
    assert interval.estimate == pytest.approx(expected, abs=1e-12)
    assert interval.low < interval.estimate < interval.high and interval.rows == 500
    wider = gate_stats.paired_difference(truth, first, second, 4, confidence=0.99, resamples=500, seed=1,
                                         scored=[0, 1, 2])
    assert wider.low <= interval.low and wider.high >= interval.high


def test_a_model_compared_with_itself_has_a_zero_width_interval():
    truth, first, _ = random_pair(200, 3)
    interval = gate_stats.paired_difference(truth, first, first, 4, confidence=0.95, resamples=300, seed=0,
                                            scored=[0, 1, 2])
    assert (interval.estimate, interval.low, interval.high, interval.se) == (0.0, 0.0, 0.0, 0.0)
    assert gate_stats.decide(interval.scaled(100), -1.0, planning=0.0).status == gate_stats.PASSED


def test_mcnemar_matches_the_exact_binomial_test():
    truth = np.zeros(100, dtype=int)
    first = np.zeros(100, dtype=int)
    second = np.zeros(100, dtype=int)
    first[:3] = 1  # first wrong on 3 rows
    second[3:13] = 1  # second wrong on 10 others
    test = gate_stats.mcnemar(truth, first, second, confidence=0.95)
    assert (test.a_only, test.b_only) == (10, 3)
    assert test.p_value == pytest.approx(0.0923, abs=1e-4)  # two-sided exact binomial, 10 of 13
    assert test.difference.estimate == pytest.approx(0.07)
    assert test.difference.low < 0.07 < test.difference.high


def test_decide_passes_fails_or_asks_for_rows():
    narrow = gate_stats.Interval(0.0, -0.5, 0.5, 0.95, 0.25, 1000)
    assert gate_stats.decide(narrow, -1.0, planning=0.0).status == gate_stats.PASSED
    below = gate_stats.Interval(-3.0, -3.5, -2.5, 0.95, 0.25, 1000)
    assert gate_stats.decide(below, -1.0, planning=0.0).status == gate_stats.FAILED
    wide = gate_stats.Interval(0.0, -3.0, 3.0, 0.95, 1.5, 600)
    verdict = gate_stats.decide(wide, -1.0, planning=0.0)
    assert verdict.status == gate_stats.UNDECIDED
    # (1.96 + 0.84)^2 * (1.5^2 * 600) / 1^2 rows
    assert verdict.rows_needed == pytest.approx((1.959964 + 0.841621) ** 2 * 1.5**2 * 600, rel=1e-3)
    se_there = 1.5 * (600 / verdict.rows_needed) ** 0.5  # the same per-row spread on more rows
    enough_rows = gate_stats.Interval(-1.2, -1.2 - 2 * se_there, -1.2 + 2 * se_there, 0.95, se_there,
                                      verdict.rows_needed)
    assert gate_stats.decide(enough_rows, -1.0, planning=0.0).status == gate_stats.FAILED
    no_better_than_bound = gate_stats.Interval(-0.1, -2.0, 1.8, 0.95, 1.0, 600)
    assert gate_stats.decide(no_better_than_bound, 0.0).status == gate_stats.FAILED


def test_temperature_fit_recovers_the_temperature_that_made_the_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 3))
    true_probabilities = calibration.scale(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2.0)
    truth = np.array([rng.choice(3, p=p) for p in true_probabilities])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    fitted = calibration.fit_temperature(overconfident, truth)
    assert fitted == pytest.approx(2.0, rel=0.1)
    before = calibration.expected_calibration_error(overconfident, truth)
    after = calibration.expected_calibration_error(calibration.scale(overconfident, fitted), truth)
    assert after < before / 2


def test_every_runtime_applies_the_recorded_temperature(tmp_path, tiny_checkpoint):
    from tuneloop.artifacts import read_metadata, write_metadata
    from tuneloop.runtime import load_classifier

    compressed = export_compressed_fp32(tiny_checkpoint, tmp_path / "compressed")
    texts = ["Free prize, call now", "see you at dinner", "URGENT! you won"]
    plain = load_classifier(compressed).predict_proba(texts)
    metadata = read_metadata(compressed)
    write_metadata(compressed, {**metadata, "temperature": 0.01})
    sharpened = load_classifier(compressed)
    assert sharpened.temperature == 0.01
    probabilities = sharpened.predict_proba(texts)
    assert probabilities.argmax(1).tolist() == plain.argmax(1).tolist()
    assert probabilities.max(1).min() > plain.max(1).max()
    write_metadata(compressed, {**metadata, "temperature": -1})
    with pytest.raises(ModelError, match="temperature must be a positive number, got -1"):
        load_classifier(compressed)


def test_register_writes_the_gate_temperature_into_the_registered_tuneloop_json(tmp_path, tiny_dataset,
                                                                              tiny_checkpoint):
    from tuneloop import registry
    from tuneloop.runtime import load_classifier

    config = make_config(tmp_path, registry={"retry_attempts": 2, "retry_wait_s": 0})
    compressed = export_compressed_fp32(tiny_checkpoint, tmp_path / "compressed")
    check = {"name": "macro_f1_gain_vs_baseline_points", "value": 5.0, "threshold": 0.0, "passed": True,
             "low": 2.0, "high": 8.0, "confidence": 0.95, "status": "passed"}
    decision = {"blessed": True, "checks": [check], "slices": [{"name": "has_url=yes", "rows": 40}],
                "calibration": {"temperature": 1.7, "ece": 0.08, "ece_calibrated": 0.02, "fitted_on_rows": 90}}
    registered = registry.register(config, compressed, decision, tiny_dataset)
    version = registry.client(config).get_model_version(config.registry.model_name, registered.version)
    intervals = json.loads(version.tags["tuneloop.gate_intervals"])
    assert intervals["macro_f1_gain_vs_baseline_points"] == {"value": 5.0, "low": 2.0, "high": 8.0,
                                                             "confidence": 0.95, "status": "passed"}
    assert json.loads(version.tags["tuneloop.calibration"])["temperature"] == 1.7
    assert json.loads(version.tags["tuneloop.slices"])[0]["name"] == "has_url=yes"
    champion = registry.download_champion(config, tmp_path / "champion")
    assert load_classifier(champion.directory).temperature == 1.7
    assert json.loads((compressed / "tuneloop.json").read_text()).get("temperature") is None  # input untouched


def test_the_baseline_learns_words_and_trains_on_the_rows_finetune_trains_on(tmp_path, labelled_frame):
    train = labelled_frame.iloc[:90]
    test = labelled_frame.iloc[90:]
    predicted = baseline.fit_predict(train["text"], train["label"], test["text"])
    assert predicted == test["label"].tolist()
    config = make_config(tmp_path, training={"max_train_rows": 40, "seed": 3})
    rows = baseline.train_rows(train, config)
    assert len(rows) == 40 and rows["id"].tolist() == train.sample(n=40, random_state=3)["id"].tolist()
