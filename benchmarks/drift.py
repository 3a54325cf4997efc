"""Drift benchmark: false alarms, detection, and the cost of a check next to plain scipy tests.

Everything runs through :func:`tuneloop.monitoring.check_drift` with the default ``monitoring``
config (``min_rows`` 200, ``drift_share`` 0.5, prediction drift by Jensen-Shannon distance 0.1,
Evidently's default methods for the rest), on prediction-log Parquet files written the way the
server writes them.

Data: the SMS spam example (``examples/sms_spam/data``, 4522 messages). Rows are split with
:func:`tuneloop.datasets.assign_split` and the default shares and salt (validation 0.15, test 0.15,
``tuneloop``): the **reference** is the train split (3173 rows) with its text statistics
(:func:`tuneloop.features.text_statistics`); served traffic is drawn from the held-out **test** split
(673 rows). Served predictions come from a cheap model, TF-IDF + logistic regression fitted on the
train split; reference predictions are the train labels (``monitoring.reference_predictions: labels``,
the default), so the prediction column compares what a model serves with what it was trained on.

1. False alarms: ``--windows`` (20) windows of ``--window-size`` (500) requests, each a seeded sample
   without replacement from the test split. Share of windows flagged ``drift`` (target <= 5%).
2. Detection: as many windows of which ``--campaign-share`` (30%) are replaced by a new smishing
   campaign: synthetic messages in four templates (parcel redelivery, bank sign-in check, prize claim,
   tax refund), each with a URL on a fresh random domain and a 10-12 digit reference or phone number,
   none of them in the training data. Share flagged ``drift`` (target 100%).
3. Cost: ``--rows`` (100000) logged rows (test-split messages drawn with replacement, in files of
   1000 rows) checked end to end (read the files, Evidently descriptors and drift preset, HTML and
   JSON written), with and without Evidently's text-content drift on the raw text, next to plain
   per-column scipy tests on the same data held in memory: ``ks_2samp`` on the six numerical
   statistic columns and ``chi2_contingency`` on ``has_url``, ``has_phone_number`` and the predicted
   label. The baseline computes no descriptors, no text drift, no report: it is the floor.

Usage (from the repository root; a few minutes on 2 cores):

    .venv/bin/python benchmarks/drift.py [--windows 20] [--window-size 500] [--rows 100000] [--json out.json]

``--demo --config examples/sms_spam/tuneloop.yaml`` runs the loop for real instead (after ``make
demo`` registered a champion): it serves a window of test-split messages through the champion
in-process (:class:`tuneloop.serving.ServingRuntime`, which writes the prediction log), runs
:func:`tuneloop.monitoring.monitor` (no drift expected), then serves a window with the campaign mixed
in and monitors again: drift, an alert, and a retraining run as ``monitoring.trigger`` says (``local``:
the training pipeline runs through ``kfp.local``, which takes minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneloop import monitoring, prediction_log  # noqa: E402
from tuneloop.config import SplitConfig, parse_config, resolve_config_paths  # noqa: E402
from tuneloop.datasets import assign_split  # noqa: E402
from tuneloop.features import STATISTIC_COLUMNS, text_statistics  # noqa: E402

DATA = ROOT / "examples" / "sms_spam" / "data"
VERSION = "1"
NOW = pd.Timestamp("2025-03-01 12:00:00", tz="UTC")

CAMPAIGN_TEMPLATES = [
    "Your parcel {digits} could not be delivered. Reschedule now: http://{domain}.info/r/{code} or call {phone}",
    "ALERT: new sign-in to your account {digits}. If this was not you verify at https://secure-{domain}.com/v/{code}",
    "Congratulations! You have been selected for a {amount} GBP reward. Claim at www.{domain}-prize.net code {digits}",
    "HMRC: your tax refund of {amount} GBP is pending. Submit your details at http://{domain}-refund.org/{code} "
    "ref {digits}",
]


def load_example() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train split (reference) and the test split (served traffic) of the SMS spam example."""
    texts = pd.read_parquet(DATA / "texts.parquet")
    labels = pd.read_parquet(DATA / "labels.parquet")
    frame = texts[["id", "text"]].merge(labels[["id", "label"]], on="id")
    split = SplitConfig()
    frame["split"] = [assign_split(key, validation=split.validation, test=split.test, salt=split.salt)
                      for key in frame["id"]]
    frame = pd.concat([frame.reset_index(drop=True), text_statistics(frame["text"]).reset_index(drop=True)], axis=1)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    return train, frame[frame["split"] == "test"].reset_index(drop=True)


def fit_model(train: pd.DataFrame):
    """The cheap stand-in for the served model: TF-IDF (words 1-2) + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                          LogisticRegression(max_iter=1000, class_weight="balanced"))
    return model.fit(train["text"], train["label"])


def campaign(rows: int, rng: np.random.Generator) -> list[str]:
    """Synthetic smishing messages: a URL on a random domain and a long digit string each."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    messages = []
    for _ in range(rows):
        template = CAMPAIGN_TEMPLATES[int(rng.integers(len(CAMPAIGN_TEMPLATES)))]
        messages.append(template.format(
            digits="".join(map(str, rng.integers(0, 10, int(rng.integers(10, 13))))),
            phone="0" + "".join(map(str, rng.integers(0, 10, 10))),
            domain="".join(rng.choice(letters, int(rng.integers(5, 10)))),
            code="".join(rng.choice(letters, 6)) + str(int(rng.integers(100, 999))),
            amount=int(rng.integers(100, 2000)),
        ))
    return messages


def log_frame(texts: list[str], model, when: pd.Timestamp = NOW) -> pd.DataFrame:
    """Prediction-log rows as the server writes them: ids, time, version, text, statistics, label."""
    probabilities = model.predict_proba(texts)
    classes = list(model.classes_)
    best = probabilities.argmax(axis=1)
    served = pd.date_range(end=when, periods=len(texts), freq="s", tz="UTC")
    frame = pd.DataFrame({
        "request_id": [prediction_log.new_request_id(moment) for moment in served],
        "timestamp": served,
        "model_version": VERSION,
        "text": texts,
    })
    frame = pd.concat([frame, text_statistics(frame["text"])], axis=1)
    frame["predicted_label"] = [classes[i] for i in best]
    frame["confidence"] = probabilities.max(axis=1)
    for index, label in enumerate(classes):
        frame[f"probability_{label}"] = probabilities[:, index]
    return frame


def write_log(folder: Path, frame: pd.DataFrame, rows_per_file: int) -> None:
    """The frame as the serving replicas would log it, one flush per ``rows_per_file`` records."""
    for start in range(0, len(frame), rows_per_file):
        prediction_log.append(str(folder), frame.iloc[start:start + rows_per_file])


def make_config(state_dir: Path, **monitoring_settings):
    raw = {"name": "drift-bench", "state_dir": str(state_dir),
           "data": {"texts": str(DATA / "texts.parquet"), "labels": str(DATA / "labels.parquet"),
                    "classes": ["ham", "spam"]},
           "monitoring": {"trigger": "none", **monitoring_settings}}
    return resolve_config_paths(parse_config(raw, source="benchmark"), base_dir=ROOT)


def check_window(texts: list[str], model, reference: pd.DataFrame, scratch: Path, **settings) -> dict:
    state = scratch / uuid.uuid4().hex[:8]
    config = make_config(state, **settings)
    write_log(state / "predictions", log_frame(texts, model), rows_per_file=1000)
    report = monitoring.check_drift(config, str(len(texts)), reference=reference, model_version=VERSION, now=NOW)
    return report.summary


def windows(args, test: pd.DataFrame, model, reference: pd.DataFrame, scratch: Path, *, shift: bool) -> dict:
    flagged, shares, columns = 0, [], {}
    seconds = []
    for number in range(args.windows):
        rng = np.random.default_rng(args.seed + number + (10_000 if shift else 0))
        size = args.window_size
        injected = int(round(size * args.campaign_share)) if shift else 0
        texts = test["text"].to_numpy()[rng.choice(len(test), size - injected, replace=False)].tolist()
        texts += campaign(injected, rng)
        started = time.perf_counter()
        summary = check_window(texts, model, reference, scratch)
        seconds.append(time.perf_counter() - started)
        flagged += summary["verdict"] == monitoring.DRIFT
        shares.append(summary["drift_share"])
        for column in summary["drifted_columns"]:
            columns[column] = columns.get(column, 0) + 1
    return {"windows": args.windows, "flagged": flagged, "share_flagged": flagged / args.windows,
            "drift_share_mean": statistics.fmean(shares), "drift_share_max": max(shares),
            "columns_flagged": dict(sorted(columns.items(), key=lambda item: -item[1])),
            "seconds_per_check_median": statistics.median(seconds)}


def scipy_baseline(reference: pd.DataFrame, current: pd.DataFrame) -> dict:
    """Plain per-column tests: KS on the numerical statistics, chi-square on the categorical ones."""
    from scipy.stats import chi2_contingency, ks_2samp

    results = {}
    for column in monitoring.NUMERICAL_STATISTICS:
        results[column] = float(ks_2samp(reference[column], current[column]).pvalue)
    for column in (*monitoring.CATEGORICAL_STATISTICS, "predicted_label"):
        values = sorted(set(reference[column]) | set(current[column]))
        table = [[int((frame[column] == v).sum()) for v in values] for frame in (reference, current)]
        results[column] = float(chi2_contingency(table).pvalue)
    return results


def cost(args, test: pd.DataFrame, model, reference: pd.DataFrame, scratch: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    texts = test["text"].to_numpy()[rng.choice(len(test), args.rows, replace=True)].tolist()
    frame = log_frame(texts, model)
    timings: dict[str, list[float]] = {"ours": [], "ours_no_text_drift": [], "scipy": []}
    for variant, settings in (("ours", {}), ("ours_no_text_drift", {"text_content_drift": False})):
        state = scratch / f"cost-{variant}"
        write_log(state / "predictions", frame, rows_per_file=1000)
        config = make_config(state, **settings)
        for _ in range(args.repeats):
            started = time.perf_counter()
            report = monitoring.check_drift(config, str(args.rows), reference=reference, model_version=VERSION, now=NOW)
            timings[variant].append(time.perf_counter() - started)
            assert report.summary["rows"]["current"] == args.rows
    reference_rows = reference.rename(columns={"label": "predicted_label"})
    for _ in range(args.repeats):
        started = time.perf_counter()
        scipy_baseline(reference_rows, frame)
        timings["scipy"].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in timings.items()}
    return {"rows": args.rows, "files": -(-args.rows // 1000), "repeats": args.repeats,
            "seconds_median": median, "seconds_all": timings,
            "ratio_ours_to_scipy": median["ours"] / median["scipy"],
            "ratio_ours_no_text_drift_to_scipy": median["ours_no_text_drift"] / median["scipy"]}


def demo(args) -> int:
    """Serve two windows through the champion and monitor after each (see the module docstring)."""
    from tuneloop.config import load_config
    from tuneloop.serving import ServingRuntime

    config = load_config(args.config)
    if monitoring.monitored_version(config) is None:
        print(f"error: no champion in the registry of {args.config}: run `make demo` first", file=sys.stderr)
        return 2
    _, test = load_example()
    rng = np.random.default_rng(args.seed)
    size = min(args.window_size, len(test))
    runtime = ServingRuntime(config)
    served_version = runtime.model.version
    outcomes = []
    try:
        for title, injected in (("in-distribution traffic", 0), (f"{args.campaign_share:.0%} campaign traffic",
                                                                int(round(size * args.campaign_share)))):
            texts = test["text"].to_numpy()[rng.choice(len(test), size - injected, replace=False)].tolist()
            texts += campaign(injected, rng)
            order = rng.permutation(len(texts))
            texts = [texts[i] for i in order]
            print(f"\n== serving {len(texts)} messages of {title} through version {runtime.model.version}", flush=True)
            for start in range(0, len(texts), config.deployment.max_batch_items):
                runtime.predict(texts[start:start + config.deployment.max_batch_items])
            runtime.flush()
            print(f"== tuneloop monitor --window {len(texts)}", flush=True)
            outcomes.append(monitoring.monitor(config, str(len(texts))))
    finally:
        runtime.close()
    for repeat in (1, 2):
        print(f"\n== tuneloop monitor again ({repeat} of 2) within the cooldown: no second retraining run",
              flush=True)
        # The retraining run has moved champion on; check the traffic of the version that served it.
        outcomes.append(monitoring.monitor(config, str(size), model_version=served_version))
    verdicts = [outcome.verdict for outcome in outcomes]
    triggers = [getattr(outcome.trigger, "status", None) for outcome in outcomes]
    started = [t for t in triggers if t == "started"]
    print(f"\ndemo: verdicts {verdicts}; exit codes {[outcome.exit_code for outcome in outcomes]}; "
          f"retraining triggers {triggers}", flush=True)
    expected = (verdicts == [monitoring.NO_DRIFT, monitoring.DRIFT, monitoring.DRIFT, monitoring.DRIFT]
                and triggers[1] == "started" and triggers[2:] == ["cooldown", "cooldown"])
    print("demo: " + ("ok: one drift, one alert, exactly one retraining run" if expected else "UNEXPECTED outcome"))
    return 0 if expected else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=500)
    parser.add_argument("--campaign-share", type=float, default=0.3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--demo", action="store_true", help="Run the drift loop for real on --config's champion.")
    parser.add_argument("--config", default="examples/sms_spam/tuneloop.yaml", help="tuneloop.yaml (--demo).")
    args = parser.parse_args()
    if args.demo:
        return demo(args)

    train, test = load_example()
    if args.window_size > len(test):
        parser.error(f"--window-size {args.window_size} exceeds the test split ({len(test)} rows)")
    model = fit_model(train)
    reference = train[["text", "label", *STATISTIC_COLUMNS]]
    print(f"reference: train split, {len(train)} rows; served traffic from the test split, {len(test)} rows",
          flush=True)
    results = {"reference_rows": len(train), "test_rows": len(test), "window_size": args.window_size,
               "campaign_share": args.campaign_share}
    with tempfile.TemporaryDirectory(prefix="tuneloop-drift-bench-") as scratch:
        scratch = Path(scratch)
        import contextlib
        import io

        import evidently.descriptors  # noqa: F401 (import Evidently outside the timings)
        import evidently.presets  # noqa: F401
        with contextlib.redirect_stdout(io.StringIO()):
            results["false_alarms"] = windows(args, test, model, reference, scratch, shift=False)
        print_windows("in-distribution", results["false_alarms"], "false alarms", "<= 5%")
        with contextlib.redirect_stdout(io.StringIO()):
            results["detection"] = windows(args, test, model, reference, scratch, shift=True)
        print_windows(f"{args.campaign_share:.0%} campaign", results["detection"], "detected", "100%")
        with contextlib.redirect_stdout(io.StringIO()):
            results["cost"] = cost(args, test, model, reference, scratch)
    c = results["cost"]
    m = c["seconds_median"]
    print(f"cost on {c['rows']} logged rows ({c['files']} files), median of {c['repeats']}:")
    print(f"  tuneloop check_drift (read log, Evidently incl. text drift, HTML+JSON): {m['ours']:.2f} s")
    print(f"  tuneloop check_drift, text_content_drift off:                          {m['ours_no_text_drift']:.2f} s")
    print(f"  plain scipy ks_2samp/chi2 per column, in memory:                      {m['scipy']:.3f} s")
    print(f"  ratio ours/scipy: {c['ratio_ours_to_scipy']:.0f}x "
          f"(text drift off: {c['ratio_ours_no_text_drift_to_scipy']:.0f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = results["false_alarms"]["share_flagged"] <= 0.05 and results["detection"]["share_flagged"] == 1.0
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


def print_windows(name: str, result: dict, what: str, target: str) -> None:
    print(f"{name}: {result['flagged']}/{result['windows']} windows flagged drift "
          f"({what} {result['share_flagged']:.0%}, target {target}); drift share mean "
          f"{result['drift_share_mean']:.2f}, max {result['drift_share_max']:.2f}; columns flagged "
          f"{result['columns_flagged'] or 'none'}; {result['seconds_per_check_median']:.2f} s per check",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
