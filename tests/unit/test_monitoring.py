"""Drift monitoring (Evidently) on tiny synthetic traffic: windows, skipped files, versions, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_config
from tuneloop import monitoring, prediction_log, registry
from tuneloop.artifacts import write_metadata
from tuneloop.errors import ConfigError

NOW = pd.Timestamp("2025-03-01 12:00:00", tz="UTC")
HAM = ["Ok lar, see you at {n}", "I'll be home soon, do you want milk?", "Sorry, can't make dinner tonight",
       "Are we still meeting at the library at {n}?", "haha that is so funny", "call me when you get this",
       "Going to the gym now, back by {n}", "Did you watch the game last night?"]
SPAM = ["WINNER!! Claim your prize, call 0906{n}", "Free entry to win a cup final ticket, txt WIN to 8{n}"]
CAMPAIGN = ["URGENT! Your parcel {n} is held. Pay the fee at http://dlvry-{n}.info/p?id={n}{n} or call 0{n}{n}",
            "ALERT: account {n}{n} locked. Verify now at www.secure-{n}.com/login ref {n}{n}{n}"]


def traffic(rows: int, seed: int, *, spam: float = 0.15, campaign: float = 0.0) -> pd.DataFrame:
    """Texts with labels: ham, classic spam and (when ``campaign`` > 0) a new URL/digit spam campaign."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(rows):
        draw = rng.random()
        if draw < campaign:
            pool, label = CAMPAIGN, "spam"
        elif draw < campaign + spam:
            pool, label = SPAM, "spam"
        else:
            pool, label = HAM, "ham"
        text = pool[int(rng.integers(len(pool)))].format(n=int(rng.integers(10_000, 99_999)))
        records.append({"text": text, "label": label})
    return pd.DataFrame.from_records(records)


def log_records(texts: pd.DataFrame, *, version: str = "1", when: pd.Timestamp = NOW,
                spread_minutes: int = 60) -> pd.DataFrame:
    """Prediction-log records as the server makes them (predicted label = the label here), served
    over the ``spread_minutes`` before ``when``."""
    offsets = np.linspace(spread_minutes, 1, len(texts)) if len(texts) else []
    records = []
    for text, label, minutes in zip(texts["text"], texts["label"], offsets):
        served = (when - pd.Timedelta(seconds=int(minutes * 60))).to_pydatetime()
        records.append({"request_id": prediction_log.new_request_id(served), "timestamp": served,
                        "model_version": version, "text": text, "predicted_label": label, "confidence": 0.9,
                        "probability_ham": 0.9 if label == "ham" else 0.1,
                        "probability_spam": 0.1 if label == "ham" else 0.9})
    return prediction_log.with_text_features(records)


def write_log(config, texts: pd.DataFrame, **options) -> pd.DataFrame:
    """Write one flush of prediction records to the config's log; returns them."""
    frame = log_records(texts, **options)
    assert prediction_log.append(prediction_log.prediction_log_uri(config), frame)
    return frame


def write_feedback(config, logged: pd.DataFrame, *, wrong_share: float = 0.0, when: pd.Timestamp = NOW) -> None:
    flip = np.random.default_rng(7).random(len(logged)) < wrong_share
    labels = [("spam" if p == "ham" else "ham") if f else p for p, f in zip(logged["predicted_label"], flip)]
    feedback = pd.DataFrame({"request_id": logged["request_id"], "timestamp": when.to_pydatetime(),
                             "served_at": [prediction_log.request_id_time(i) for i in logged["request_id"]],
                             "label": labels, "model_version": logged["model_version"],
                             "predicted_label": logged["predicted_label"]})
    assert prediction_log.append(prediction_log.prediction_log_uri(config), feedback, prediction_log.FEEDBACK)


def partition_folder(config, when: pd.Timestamp = NOW - pd.Timedelta(minutes=30)) -> Path:
    """The local folder of the partition of ``when`` (the default: the hour ``write_log`` fills)."""
    return Path(prediction_log.partition_path(prediction_log.prediction_log_uri(config), prediction_log.PREDICTIONS,
                                              *prediction_log.partition_of(when)))


@pytest.fixture
def reference() -> pd.DataFrame:
    return traffic(800, seed=1)


def check(config, reference, window="24h", **kwargs):
    return monitoring.check_drift(config, window, reference=reference, model_version="1", now=NOW, **kwargs)


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("spec, duration, records", [
    ("24h", pd.Timedelta(hours=24), None), ("90m", pd.Timedelta(minutes=90), None), ("7d", pd.Timedelta(days=7), None),
    (" 2w ", pd.Timedelta(weeks=2), None), ("5000", None, 5000), (300, None, 300),
])
def test_parse_window(spec, duration, records):
    window = monitoring.parse_window(spec)
    assert window.records == records
    assert (pd.Timedelta(window.duration) if window.duration else None) == duration


@pytest.mark.parametrize("spec", ["", "0", "24x", "h", "-5", "1.5h"])
def test_bad_window_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="invalid window"):
        monitoring.parse_window(spec)


# --------------------------------------------------------------------------------------------
# Too little data: insufficient_data, never drift, never a crash


def test_no_log_files_is_insufficient_data(tmp_path, reference, capsys):
    config = make_config(tmp_path, monitoring={"trigger": "none"})
    outcome = monitoring.monitor(config, "24h", reference=reference, model_version="1", now=NOW)
    assert outcome.verdict == monitoring.INSUFFICIENT_DATA and outcome.exit_code == 11
    assert "no prediction log files" in outcome.report.summary["reasons"][0]
    assert last_line(capsys) == "verdict: insufficient data"
    assert outcome.report.html_path.is_file() and "insufficient data" in outcome.report.html_path.read_text()
    assert json.loads(outcome.report.json_path.read_text())["verdict"] == "insufficient_data"


def test_empty_window_is_insufficient_data(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 50})
    write_log(config, traffic(300, seed=2), when=NOW - pd.Timedelta(days=3))
    report = check(config, reference, "24h")
    assert report.verdict == monitoring.INSUFFICIENT_DATA
    assert "no prediction log files" in report.summary["reasons"][0]  # the old file is not even opened


def test_window_without_records_of_any_time_is_insufficient_data(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 50})
    # a file in a partition inside the window whose records all lie outside it (a writer with a skewed clock)
    folder = partition_folder(config)
    folder.mkdir(parents=True)
    log_records(traffic(100, seed=2), when=NOW - pd.Timedelta(days=3)).to_parquet(folder / "skewed-000000.parquet")
    report = check(config, reference, "24h")
    assert report.verdict == monitoring.INSUFFICIENT_DATA
    assert "holds no records" in report.summary["reasons"][0]


def test_window_of_three_rows_is_insufficient_data_even_when_shifted(tmp_path, reference, capsys):
    config = make_config(tmp_path, monitoring={"trigger": "none"})
    write_log(config, traffic(3, seed=3, campaign=1.0))
    outcome = monitoring.monitor(config, "24h", reference=reference, model_version="1", now=NOW)
    assert outcome.verdict == monitoring.INSUFFICIENT_DATA and not outcome.report.drift
    assert "3 records of version 1" in outcome.report.summary["reasons"][0]
    assert "min_rows=200" in outcome.report.summary["reasons"][0]
    assert last_line(capsys) == "verdict: insufficient data"
    by_count = check(config, reference, "3")
    assert by_count.verdict == monitoring.INSUFFICIENT_DATA and by_count.summary["rows"]["current"] == 3


def test_no_champion_is_insufficient_data(tmp_path, shared_registry):
    config = make_config(tmp_path, monitoring={"min_rows": 1},
                         registry={"model_name": "never-registered", "tracking_uri": shared_registry})
    write_log(config, traffic(20, seed=2))
    report = monitoring.check_drift(config, "24h", now=NOW)
    assert report.verdict == monitoring.INSUFFICIENT_DATA
    assert "no champion" in report.summary["reasons"][0]


# --------------------------------------------------------------------------------------------
# Verdicts


def test_in_distribution_sample_is_no_drift(tmp_path, reference, capsys):
    config = make_config(tmp_path, monitoring={"min_rows": 100, "trigger": "none"})
    write_log(config, traffic(300, seed=2))
    outcome = monitoring.monitor(config, "24h", reference=reference, model_version="1", now=NOW)
    summary = outcome.report.summary
    assert outcome.verdict == monitoring.NO_DRIFT and outcome.exit_code == 0, summary["reasons"]
    assert last_line(capsys) == "verdict: no drift"
    assert summary["rows"] == {"current": 300, "reference": 800, "min_rows": 100}
    assert summary["drift_share"] < 0.5 and not summary["prediction"]["drifted"]
    covered = {c["column"] for c in summary["columns"]}
    assert covered == set(monitoring.known_columns())
    assert summary["evidently"]["metrics"], "Evidently's own results are kept"
    assert outcome.trigger is None and outcome.alert is None


def test_shifted_sample_is_drift(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100})
    write_log(config, traffic(300, seed=2, campaign=0.6))
    report = check(config, reference)
    summary = report.summary
    assert report.verdict == monitoring.DRIFT and summary["drift"] is True
    drifted = set(summary["drifted_columns"])
    assert {"has_url", "digit_share", "predicted_label"} <= drifted
    assert summary["drift_share"] >= 0.5
    assert any(reason.startswith("prediction distribution drifted") for reason in summary["reasons"])
    assert summary["prediction"]["current_distribution"]["spam"] > 0.6
    page = report.html_path.read_text()
    assert "verdict: drift detected" in page and "has_url" in page
    message, details = monitoring.drift_alert(summary)
    assert "version 1" in message and "has_url" in message and str(report.html_path) in message
    assert details["model_version"] == "1" and details["report"] == str(report.html_path)
    assert {c["column"] for c in details["drifted_columns"]} == drifted


def test_critical_column_alone_is_drift(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100, "drift_share": 1.0, "prediction_drift": False,
                                               "critical_columns": ["has_url"]})
    write_log(config, traffic(300, seed=2, campaign=0.2))
    report = check(config, reference)
    assert report.verdict == monitoring.DRIFT
    assert any(reason.startswith("critical column has_url") for reason in report.summary["reasons"])


def test_unknown_critical_column_is_a_config_error(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 10, "critical_columns": ["nope"]})
    write_log(config, traffic(50, seed=2))
    with pytest.raises(ConfigError, match="critical_columns"):
        check(config, reference)


# --------------------------------------------------------------------------------------------
# What is read, what is left out


def test_corrupt_and_truncated_files_are_skipped_and_named(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100})
    write_log(config, traffic(300, seed=2))
    folder = partition_folder(config)
    (good,) = folder.iterdir()
    garbage, truncated = folder / "replica-b-000001-garbage.parquet", folder / "replica-c-000002-truncated.parquet"
    garbage.write_bytes(b"not parquet at all")
    truncated.write_bytes(good.read_bytes()[:-100])
    report = check(config, reference)
    skipped = {entry["path"]: entry["reason"] for entry in report.summary["log"]["files_skipped"]}
    assert set(skipped) == {str(garbage), str(truncated)}
    assert all("Parquet" in reason for reason in skipped.values()), skipped
    assert report.summary["rows"]["current"] == 300 and report.verdict == monitoring.NO_DRIFT
    page = report.html_path.read_text()
    assert "garbage.parquet" in page and "truncated.parquet" in page


def test_only_corrupt_files_is_insufficient_data(tmp_path, reference):
    config = make_config(tmp_path)
    folder = partition_folder(config)
    folder.mkdir(parents=True)
    (folder / "replica-a-000000.parquet").write_bytes(b"PAR1broken")
    report = check(config, reference)
    assert report.verdict == monitoring.INSUFFICIENT_DATA
    assert "no readable prediction log file" in report.summary["reasons"][0]
    assert len(report.summary["log"]["files_skipped"]) == 1


def test_record_count_window_takes_the_newest_records(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100})
    write_log(config, traffic(300, seed=4, campaign=0.6), when=NOW - pd.Timedelta(days=2))
    write_log(config, traffic(250, seed=2), when=NOW)
    report = check(config, reference, "250")
    assert report.summary["rows"]["current"] == 250
    assert report.summary["log"]["files_read"] == 1  # the newest file had enough
    assert report.verdict == monitoring.NO_DRIFT
    assert check(config, reference, "7d").verdict == monitoring.DRIFT


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory) -> str:
    """A real SQLite registry (built once: MLflow's migrations take seconds) with versions 1 and 2
    (champion) of model ``test-model``, each with its own training frame."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = make_config(root, registry={"model_name": "test-model", "tracking_uri": uri})
    compressed = root / "compressed"
    write_metadata(compressed, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                                "labels": ["ham", "spam"], "base_model": "tiny", "data_fingerprint": "f00d"})
    (compressed / "model.onnx").write_bytes(b"onnx bytes")
    decision = {"blessed": True, "checks": [], "test_metrics": {"macro_f1": 0.95, "accuracy": 0.97}}
    for version, seed in (("1", 11), ("2", 1)):
        frame = traffic(800, seed=seed, campaign=0.6 if version == "1" else 0.0)
        frame.insert(0, "id", [f"v{version}-{i}" for i in range(len(frame))])
        frame["split"] = "train"
        path = root / f"dataset-{version}.parquet"
        frame.to_parquet(path, index=False)
        assert registry.register(config, compressed, decision, path).version == version
    return uri


@pytest.fixture
def two_versions(tmp_path, shared_registry):
    """A config of its own (state, logs) on the shared registry."""
    return make_config(tmp_path, monitoring={"min_rows": 100, "embedding_drift": False},  # its model is bytes
                       registry={"model_name": "test-model", "tracking_uri": shared_registry})


def test_reference_comes_from_the_champions_lineage_and_older_versions_are_left_out(two_versions):
    config = two_versions
    write_log(config, traffic(300, seed=2), version="2")
    write_log(config, traffic(120, seed=5, campaign=0.9), version="1")  # the old champion's traffic
    report = monitoring.check_drift(config, "24h", now=NOW)
    summary = report.summary
    assert summary["model_version"] == "2"
    assert summary["reference"]["uri"].endswith("/data/dataset.parquet") and summary["reference"]["rows"] == 800
    assert summary["log"]["other_versions"] == {"1": 120}
    assert summary["rows"]["current"] == 300
    assert report.verdict == monitoring.NO_DRIFT, summary["reasons"]
    assert "120 records of version 1" in report.html_path.read_text()
    cached = monitoring.reference_cache_dir(config, "2") / "dataset.parquet"
    assert cached.is_file(), "the training frame is downloaded once and cached"


def test_only_older_version_records_is_insufficient_data(two_versions):
    config = two_versions
    write_log(config, traffic(300, seed=2), version="1")
    report = monitoring.check_drift(config, "24h", now=NOW)
    assert report.verdict == monitoring.INSUFFICIENT_DATA
    assert "0 records of version 2" in report.summary["reasons"][0]
    assert "version 1: 300" in report.summary["reasons"][0]


def test_pinned_deployment_version_is_the_one_monitored(two_versions):
    config = two_versions
    config.deployment.model_version = "1"
    write_log(config, traffic(300, seed=6, campaign=0.6), version="1")
    report = monitoring.check_drift(config, "24h", now=NOW)
    assert report.summary["model_version"] == "1"
    assert report.verdict == monitoring.NO_DRIFT, "version 1 was trained on campaign traffic"


# --------------------------------------------------------------------------------------------
# Feedback labels


def test_feedback_labels_add_classification_quality(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100, "min_feedback_rows": 50})
    logged = write_log(config, traffic(300, seed=2))
    write_feedback(config, logged, wrong_share=0.3)
    report = check(config, reference)
    quality = report.summary["quality"]
    assert quality["rows"] == 300 and 0.6 < quality["accuracy"] < 0.8
    assert "Quality on feedback labels" in report.html_path.read_text()
    assert report.verdict == monitoring.NO_DRIFT  # no quality limit configured


def test_quality_drop_beyond_the_limit_is_drift(two_versions):
    config = two_versions
    config.monitoring.max_quality_drop_points = 5.0
    logged = write_log(config, traffic(300, seed=2), version="2")
    write_feedback(config, logged, wrong_share=0.3)
    report = monitoring.check_drift(config, "24h", now=NOW)
    quality = report.summary["quality"]
    assert quality["version_test_macro_f1"] == 0.95 and quality["macro_f1_drop_points"] > 5
    assert report.verdict == monitoring.DRIFT
    assert any("feedback labels" in reason for reason in report.summary["reasons"])


# --------------------------------------------------------------------------------------------
# The pipeline


def test_monitoring_pipeline_alerts_and_retrains_only_on_drift(tmp_path):
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from tests.pipelines.conftest import cluster_config
    from tuneloop.orchestration import compile_pipeline

    output = compile_pipeline(Path(__file__).resolve().parents[2] / "pipelines" / "monitoring.py",
                              tmp_path / "monitoring.yaml", cluster_config())
    spec = json_format.ParseDict(next(yaml.safe_load_all(output.read_text())), pipeline_spec_pb2.PipelineSpec(),
                                 ignore_unknown_fields=False)
    assert spec.pipeline_info.name == "tuneloop-monitoring"
    assert set(spec.root.dag.tasks) == {"exit-handler-1", "notify"}
    inner = spec.components["comp-exit-handler-1"].dag.tasks
    (condition,) = [task for name, task in inner.items() if name.startswith("condition")]
    expected = "inputs.parameter_values['pipelinechannel--monitor-drift-drift'] == true"
    assert condition.trigger_policy.condition == expected
    branch = spec.components[condition.component_ref.name].dag.tasks
    assert set(branch) == {"notify-drift", "trigger-retraining"}
    assert list(branch["trigger-retraining"].dependent_tasks) == ["notify-drift"]
    assert "window" in spec.root.input_definitions.parameters


# --------------------------------------------------------------------------------------------
# The log on object storage


def test_drift_check_reads_the_shared_log_on_s3(tmp_path, reference, s3_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    config = make_config(tmp_path, monitoring={"min_rows": 100},
                         deployment={"prediction_log_uri": f"s3://tuneloop/monitor-{tmp_path.name}"})
    write_log(config, traffic(300, seed=2))
    report = check(config, reference)
    assert report.verdict == monitoring.NO_DRIFT and report.summary["rows"]["current"] == 300
    assert report.summary["log"]["uri"].startswith("s3://tuneloop/monitor-")
    config.deployment.prediction_log_uri = "s3://no-such-bucket/log"
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket'"):
        check(config, reference)


# --------------------------------------------------------------------------------------------
# The whole-window tier (DuckDB) and the embedding signal


def test_a_window_larger_than_the_sample_is_aggregated_whole_and_sampled_for_evidently(tmp_path, reference):
    """A window too large to load is streamed: DuckDB counts and aggregates every record, only a bounded
    sample is materialised (here 100 of 3000 records)."""
    config = make_config(tmp_path, monitoring={"min_rows": 100, "current_max_rows": 100,
                                               "histogram_memory_limit": "64MB", "histogram_threads": 1})
    logged = pd.concat([write_log(config, traffic(1500, seed=seed)) for seed in (2, 3)], ignore_index=True)
    report = check(config, reference)
    summary = report.summary
    assert summary["rows"]["current"] == 3000 and summary["rows"]["analysed"] == 100
    assert summary["log"]["files_read"] == 2
    char_count = next(c for c in summary["columns"] if c["column"] == "char_count")
    assert char_count["window_rows"] == 3000
    current = monitoring.scan_window(config, monitoring.parse_window("24h"), "1", now=NOW)
    assert len(current.frame) == 100 and current.rows == 3000
    expected = logged["char_count"].value_counts().sort_index()
    assert current.value_counts["char_count"].to_dict() == expected.to_dict()
    assert current.value_counts["predicted_label"].to_dict() == logged["predicted_label"].value_counts().to_dict()


def test_record_count_window_streams_only_the_newest_records(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 100, "current_max_rows": 100})
    write_log(config, traffic(300, seed=4, campaign=0.6), when=NOW - pd.Timedelta(days=2))
    newest = write_log(config, traffic(400, seed=2), when=NOW)
    current = monitoring.scan_window(config, monitoring.parse_window("250"), "1", now=NOW)
    assert current.rows == 250 and len(current.frame) == 100
    assert current.frame["timestamp"].min() >= newest["timestamp"].sort_values().iloc[-250]


def test_rows_logged_without_statistics_get_them_from_their_text(tmp_path, reference):
    config = make_config(tmp_path, monitoring={"min_rows": 10})
    logged = log_records(traffic(60, seed=2)).drop(columns=["char_count", "has_url"])
    prediction_log.append(prediction_log.prediction_log_uri(config), logged)
    current = monitoring.scan_window(config, monitoring.parse_window("24h"), "1", now=NOW)
    assert current.rows_without_statistics == 60
    expected = logged["text"].str.len().value_counts().sort_index()
    assert current.value_counts["char_count"].to_dict() == expected.to_dict()


def test_window_scores_are_evidentlys_when_the_window_is_the_sample(tmp_path):
    """With a reference over 1000 rows Evidently decides by Wasserstein / Jensen-Shannon; on a window
    that is whole in the sample the window tier computes the same numbers, on the same bins."""
    config = make_config(tmp_path, monitoring={"min_rows": 100, "embedding_drift": False})
    write_log(config, traffic(400, seed=2, campaign=0.1))
    report = check(config, traffic(1500, seed=1))
    decided = [c for c in report.summary["columns"] if c["tier"] == "window"]
    assert {c["column"] for c in decided} >= {"char_count", "has_url", "predicted_label"}
    for column in decided:
        # equal up to the window tier's rounding of shares to 6 decimals
        assert column["score"] == pytest.approx(column["sample_score"], rel=1e-4, abs=1e-9), column
        assert column["drifted"] == column["sample_drifted"]
    assert report.summary["evidently_verdict"] == report.verdict


def test_histogram_scores_match_scipy_on_raw_values():
    from scipy.stats import wasserstein_distance

    from tuneloop.monitoring import histograms

    rng = np.random.default_rng(0)
    reference = pd.Series(rng.integers(0, 200, 2000))
    current = pd.Series(rng.integers(20, 260, 5000))
    counts = current.value_counts()
    expected = wasserstein_distance(reference, current) / np.std(reference)
    assert histograms.wasserstein(reference, counts) == pytest.approx(expected, rel=1e-9)
    edges = np.histogram_bin_edges(np.concatenate([reference, current]), bins="sturges")
    shares = np.histogram(reference, edges)[0] / 2000, np.histogram(current, edges)[0] / 5000
    binned = histograms.binned_shares(reference, counts, numerical=True)
    np.testing.assert_allclose(binned[0], shares[0])
    np.testing.assert_allclose(binned[1], shares[1])


def test_embedding_threshold_holds_its_false_alarm_rate_and_catches_a_small_cluster():
    from tuneloop.monitoring.embeddings import embedding_drift

    rng = np.random.default_rng(1)
    texts = [f"t{i}" for i in range(300)]
    alarms = 0
    for seed in range(40):
        data = np.random.default_rng(seed).normal(size=(300, 8)).astype(np.float32)
        result = embedding_drift(data[:200], data[200:], false_alarm_rate=0.05, permutations=100,
                                 current_texts=texts[200:], reference_texts=texts[:200], drivers=5, seed=seed)
        alarms += result.drifted
    assert alarms <= 6, f"{alarms} of 40 exchangeable windows flagged at a 5% rate"
    reference = rng.normal(size=(300, 8)).astype(np.float32)
    current = rng.normal(size=(200, 8)).astype(np.float32)
    current[:20] = rng.normal(loc=3.0, scale=0.1, size=(20, 8))  # a 10% campaign: one tight cluster
    current_texts = [f"parcel held pay fee {i}" if i < 20 else f"see you at {i}" for i in range(200)]
    result = embedding_drift(reference, current, false_alarm_rate=0.01, permutations=200,
                             current_texts=current_texts, reference_texts=[f"see you at {i}" for i in range(300)],
                             drivers=5)
    assert result.drifted and result.score > result.threshold
    assert {e["text"] for e in result.drivers["examples"]} <= set(current_texts[:20])
    assert "parcel held pay" in [g["ngram"] for g in result.drivers["ngrams"]]


@pytest.fixture(scope="module")
def tiny_embedder(tiny_checkpoint):
    from tuneloop.monitoring.embeddings import embedder_for
    from tuneloop.runtime import TorchClassifier

    return embedder_for(TorchClassifier(tiny_checkpoint, labels=["ham", "spam"], max_length=64))


def test_embedding_signal_joins_the_decision_and_names_its_drivers(tmp_path, reference, tiny_embedder):
    # write_log stores texts raw (the server masks them by default): compare the reference raw too
    config = make_config(tmp_path, monitoring={"min_rows": 100, "drift_share": 1.0, "prediction_drift": False,
                                               "embedding_max_rows": 300}, privacy={"prediction_log": "raw"})
    write_log(config, traffic(300, seed=2))
    quiet = check(config, reference, embedder=tiny_embedder).summary
    assert quiet["embedding"]["drifted"] is False and quiet["verdict"] == monitoring.NO_DRIFT, quiet["reasons"]
    other = make_config(tmp_path / "campaign", monitoring={"min_rows": 100, "drift_share": 1.0,
                                                            "prediction_drift": False, "embedding_max_rows": 300},
                        privacy={"prediction_log": "raw"})
    write_log(other, traffic(300, seed=2, campaign=0.3))
    report = check(other, reference, embedder=tiny_embedder)
    embedding = report.summary["embedding"]
    assert embedding["drifted"] and embedding["score"] > embedding["threshold"]
    assert report.verdict == monitoring.DRIFT and "embedding" in report.summary["drifted_columns"]
    assert any(reason.startswith("sentence embeddings drifted") for reason in report.summary["reasons"])
    grams = [g["ngram"] for g in embedding["drivers"]["ngrams"]]
    assert any(word in " ".join(grams) for word in ("http", "www", "verify", "parcel", "locked")), grams
    assert "sentence embeddings drifted" in report.html_path.read_text()


def test_verbatim_repeats_of_ordinary_messages_are_not_embedding_drift(tmp_path, reference, tiny_embedder):
    """Live traffic repeats popular messages verbatim, the deduplicated reference does not: the copies
    of one message must not read as a campaign of their own."""
    config = make_config(tmp_path, monitoring={"min_rows": 100, "drift_share": 1.0, "prediction_drift": False,
                                               "embedding_max_rows": 300}, privacy={"prediction_log": "raw"})
    ordinary = traffic(30, seed=2)
    write_log(config, pd.concat([ordinary] * 10, ignore_index=True))
    embedding = check(config, reference, embedder=tiny_embedder).summary["embedding"]
    assert embedding["current_rows"] == 300
    assert embedding["distinct_current_texts"] == ordinary["text"].nunique()
    assert embedding["drifted"] is False, embedding


def test_embedding_drift_with_a_model_that_cannot_embed_is_one_clear_error(tmp_path, tiny_checkpoint):
    """An ONNX classifier whose graph has no [batch, tokens, width] tensor (no encoder output)."""
    import onnx
    from onnx import TensorProto, helper

    from tuneloop.monitoring.embeddings import embedder_for
    from tuneloop.runtime import OnnxClassifier

    directory = tmp_path / "no-encoder"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_checkpoint / name).is_file():
            (directory / name).write_bytes((tiny_checkpoint / name).read_bytes())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["ids"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("MatMul", ["mean", "weight"], ["logits"])],
        "bag", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("weight", TensorProto.FLOAT, [1, 2], [0.001, -0.001])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), directory / "model.onnx")
    classifier = OnnxClassifier(directory, labels=["ham", "spam"], max_length=32)
    assert classifier.predict(["hello"]) in (["ham"], ["spam"])
    with pytest.raises(monitoring.MonitoringError) as raised:
        embedder_for(classifier)
    message = str(raised.value)
    assert "cannot produce sentence embeddings" in message and "model.onnx" in message
    assert "monitoring.embedding_drift: false" in message and "\n" not in message


def test_an_onnx_classifier_embeds_through_its_encoder_output(tmp_path, tiny_checkpoint):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tuneloop.monitoring.embeddings import embedder_for
    from tuneloop.runtime import OnnxClassifier, TorchClassifier

    directory = tmp_path / "onnx"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    ids = torch.ones((1, 8), dtype=torch.long)
    directory.mkdir()
    torch.onnx.export(model, (ids, ids), str(directory / "model.onnx"), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "s"},
                                                             "attention_mask": {0: "b", 1: "s"}}, dynamo=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_checkpoint / name).is_file():
            (directory / name).write_bytes((tiny_checkpoint / name).read_bytes())
    texts = ["see you at 5", "WINNER!! call 09061701461 now", "ok"]
    onnx_vectors = embedder_for(OnnxClassifier(directory, labels=["ham", "spam"], max_length=64)).embed(texts)
    torch_vectors = embedder_for(TorchClassifier(tiny_checkpoint, labels=["ham", "spam"], max_length=64)).embed(texts)
    np.testing.assert_allclose(onnx_vectors, torch_vectors, atol=1e-4)
