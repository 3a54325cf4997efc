"""The prediction log: layout, request ids, the buffered writer (outages, shutdown), windowed reads
with partition pruning, corrupt files, bounded feedback lookup, and two replicas on a real S3 API."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tuneloop import prediction_log as pl
from tuneloop.errors import ConfigError, ServiceUnavailableError

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 1, 12, 30, tzinfo=UTC)


def record(when: dt.datetime, text: str = "hello", version: str = "1", label: str = "ham") -> dict:
    return {"request_id": pl.new_request_id(when), "timestamp": when, "model_version": version, "text": text,
            "predicted_label": label, "confidence": 0.9, "probability_ham": 0.9, "probability_spam": 0.1}


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.fixture
def s3_uri(s3_endpoint) -> str:
    """A fresh prefix in the moto bucket ``tuneloop``, with s3fs built for this endpoint."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://tuneloop/prediction-log-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------
# Names


def test_request_ids_carry_their_serving_time_and_sort_by_it():
    first = pl.new_request_id(dt.datetime(2026, 12, 1, 13, 15, 2, 123456, tzinfo=UTC))
    later = pl.new_request_id(dt.datetime(2026, 12, 1, 13, 15, 2, 124000, tzinfo=UTC))
    assert first.startswith("20261201T131502123Z-") and len(first) == 40
    assert pl.request_id_time(first) == dt.datetime(2026, 12, 1, 13, 15, 2, 123000, tzinfo=UTC)
    assert first < later
    naive_local = dt.datetime(2026, 12, 1, 13, 0)  # naive times are taken as UTC
    assert pl.request_id_time(pl.new_request_id(naive_local)) == naive_local.replace(tzinfo=UTC)
    for malformed in ("", "no-such-id", uuid.uuid4().hex, "20261301T131502123Z-9f86d081884c7d659a2f",
                      "20261201T131502123Z-9F86D081884C7D659A2F", first + "0"):
        assert pl.request_id_time(malformed) is None, malformed


def test_writer_ids_name_the_pod_and_never_repeat():
    ids = {pl.new_writer_id({"HOSTNAME": "tuneloop-serving-7d9f8/x y"}) for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("tuneloop-serving-7d9f8_x_y-") for i in ids)


def test_safe_uri_removes_credentials():
    assert pl.safe_uri("s3://key:secret@bucket/p") == "s3://***@bucket/p"
    assert pl.safe_uri("s3://bucket/p") == "s3://bucket/p"


# --------------------------------------------------------------------------------------------
# Writing


def test_layout_one_file_per_partition_and_flush_named_by_writer(tmp_path):
    records = [record(dt.datetime(2026, 12, 1, 10, 59, 59, 999000, tzinfo=UTC), "before the hour"),
               record(dt.datetime(2026, 12, 1, 11, 0, 0, 1000, tzinfo=UTC), "after the hour"),
               record(dt.datetime(2026, 12, 1, 11, 20, tzinfo=UTC), "later")]
    writer = pl.LogWriter(str(tmp_path), pl.PREDICTIONS, writer_id="pod-a-abc123", flush_seconds=3600,
                          transform=pl.with_text_features)
    assert writer.write(records)
    assert writer.flush(timeout=10)
    writer.close()
    assert files_under(tmp_path) == [
        "predictions/date=2026-12-01/hour=10/pod-a-abc123-000000-105959999-105959999.parquet",
        "predictions/date=2026-12-01/hour=11/pod-a-abc123-000001-110000001-112000000.parquet",
    ]
    logged = pl.read_predictions(str(tmp_path))
    assert sorted(logged["text"]) == ["after the hour", "before the hour", "later"]
    assert {"char_count", "has_url"} <= set(logged.columns), "text statistics are written with the record"


def test_writer_keeps_records_through_an_outage_and_bounds_the_buffer(tmp_path, monkeypatch):
    store = {"up": False}
    attempts: list[str] = []
    original = pl.layout.write_table_atomically

    def flaky(fs, path, table):
        attempts.append(path)
        if not store["up"]:
            raise OSError("store unreachable")
        original(fs, path, table)

    monkeypatch.setattr(pl.layout, "write_table_atomically", flaky)
    dropped = []
    writer = pl.LogWriter(str(tmp_path), flush_records=1, flush_seconds=0.05, max_buffered=3, on_drop=dropped.append)
    try:
        assert writer.write([record(NOW, "a"), record(NOW, "b")])
        assert not writer.flush(timeout=5)  # the write failed; the records are kept
        assert writer.pending == 2
        assert not writer.write([record(NOW, "c"), record(NOW, "d")])  # beyond max_buffered: dropped, counted
        assert writer.dropped == 2 and dropped == [2]
        store["up"] = True
        assert writer.flush(timeout=5)
    finally:
        writer.close()
    assert sorted(pl.read_predictions(str(tmp_path))["text"]) == ["a", "b"]
    assert len(set(attempts)) == 1, "every retry wrote the same file name: a retry never duplicates records"
    assert not writer.write([record(NOW, "late")])  # closed: dropped, never raises


def test_close_retries_until_the_store_is_back(tmp_path, monkeypatch):
    failures = {"left": 3}
    original = pl.layout.write_table_atomically

    def recovering(fs, path, table):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("store unreachable")
        original(fs, path, table)

    monkeypatch.setattr(pl.layout, "write_table_atomically", recovering)
    writer = pl.LogWriter(str(tmp_path), flush_seconds=0.05, close_timeout=20)
    writer.write([record(NOW, text) for text in "xyz"])
    writer.close()
    assert writer.pending == 0 and writer.written == 3
    assert sorted(pl.read_predictions(str(tmp_path))["text"]) == ["x", "y", "z"]


def test_writes_are_atomic_no_temporary_file_is_left(tmp_path, monkeypatch):
    import pyarrow as pa

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(pl.layout.os, "replace", broken_replace)
    fs, root = pl.filesystem(str(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        pl.write_table_atomically(fs, f"{root}/predictions/date=2026-12-01/hour=12/w-000000.parquet",
                                  pa.table({"request_id": ["a"]}))
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Reading


def write_hours(uri: str) -> dict[int, list[dict]]:
    """Records of version 1 in hours 9, 10 and 12 of NOW's day (and 5 of version 2 in hour 12)."""
    written = {}
    for hour, count in ((9, 4), (10, 3), (12, 2)):
        written[hour] = [record(NOW.replace(hour=hour, minute=m), f"h{hour}-{m}") for m in range(count)]
        pl.append(uri, written[hour])
    pl.append(uri, [record(NOW.replace(hour=12, minute=m), "other", version="2") for m in range(5)])
    return written


def test_a_time_window_lists_and_opens_only_its_partitions(tmp_path):
    uri = str(tmp_path)
    write_hours(uri)
    old = tmp_path / "predictions" / "date=2026-11-20" / "hour=09"
    old.mkdir(parents=True)
    (old / "w-000000.parquet").write_bytes(b"corrupt, but outside every window below")
    read = pl.read_log(uri, start=NOW.replace(hour=10, minute=0), end=NOW, columns=["request_id", "text"], version="1")
    assert sorted(read.frame["text"]) == ["h10-0", "h10-1", "h10-2", "h12-0", "h12-1"]
    assert read.other_versions == {"2": 5}
    assert read.files_skipped == [] and len(read.files_read) == 3
    assert list(read.frame.columns) == ["request_id", "text", "timestamp", "model_version"]
    assert str(read.frame["timestamp"].dt.tz) == "UTC"
    within_an_hour = pl.read_log(uri, start=NOW.replace(hour=9, minute=2), end=NOW.replace(hour=9, minute=59))
    assert sorted(within_an_hour.frame["text"]) == ["h9-2", "h9-3"], "rows are filtered inside a partition too"


def test_the_last_records_come_from_the_newest_partitions(tmp_path):
    uri = str(tmp_path)
    write_hours(uri)
    read = pl.read_log(uri, last=4, version="1", end=NOW)
    assert sorted(read.frame["text"]) == ["h10-0", "h10-1", "h10-2", "h12-0", "h12-1"]
    assert len(read.files_read) == 3, "hour 9 was not opened"


def test_a_corrupt_file_is_skipped_and_named(tmp_path):
    uri = str(tmp_path)
    (path,) = pl.append(uri, [record(NOW, "fine")])
    folder = Path(path).parent
    garbage = folder / "pod-b-abc-000007-123000000-123000999.parquet"
    garbage.write_bytes(b"not parquet at all")
    truncated = folder / "pod-c-def-000001-123000000-123000999.parquet"
    truncated.write_bytes(Path(path).read_bytes()[:-40])
    hidden = folder / ".pod-d-000001.parquet.1234.tmp"  # a write in progress: not part of the log
    hidden.write_bytes(b"half")
    read = pl.read_log(uri, start=NOW - dt.timedelta(hours=1), end=NOW)
    assert list(read.frame["text"]) == ["fine"]
    reasons = {entry["path"]: entry["reason"] for entry in read.files_skipped}
    assert set(reasons) == {str(garbage), str(truncated)}
    assert all("\n" not in reason and "Parquet" in reason for reason in reasons.values()), reasons


def test_a_file_without_a_required_column_is_skipped_and_named(tmp_path):
    uri = str(tmp_path)
    pl.append(uri, [record(NOW, "fine")])
    (stray,) = pl.append(uri, pd.DataFrame({"timestamp": [NOW], "note": ["not a prediction"]}))
    read = pl.read_log(uri, required=("request_id", "text"))
    assert list(read.frame["text"]) == ["fine"]
    assert read.files_skipped == [{"path": stray, "reason": "missing columns request_id, text"}]


def test_an_empty_or_missing_log_reads_as_empty(tmp_path):
    read = pl.read_log(str(tmp_path / "never-written"), start=NOW - dt.timedelta(days=1), end=NOW)
    assert read.frame.empty and read.files_read == [] and read.files_skipped == []


# --------------------------------------------------------------------------------------------
# Finding a prediction by id


def test_lookup_opens_only_the_file_whose_range_holds_the_id(tmp_path, caplog):
    uri = str(tmp_path)
    early = [record(NOW.replace(minute=1, second=s), f"early {s}") for s in range(3)]
    late = [record(NOW.replace(minute=40, second=s), f"late {s}") for s in range(3)]
    (early_path,) = pl.append(uri, early, writer_id="pod-a-111111")
    pl.append(uri, late, writer_id="pod-b-222222")
    folder = Path(early_path).parent
    (folder / "pod-c-333333-000000-122000000-122500000.parquet").write_bytes(b"corrupt, range 12:20-12:25")
    with caplog.at_level(logging.WARNING, logger="tuneloop.prediction_log"):
        found = pl.find_prediction(uri, late[1]["request_id"])
    assert found["request_id"] == late[1]["request_id"] and found["model_version"] == "1"
    assert found["predicted_label"] == "ham"
    assert "corrupt" not in caplog.text, "a file whose range cannot hold the id is never opened"
    inside = folder / "pod-0-444444-000000-124000000-124002000.parquet"  # listed before pod-b
    inside.write_bytes(b"corrupt, range 12:40:00-12:40:02")
    with caplog.at_level(logging.WARNING, logger="tuneloop.prediction_log"):
        assert pl.find_prediction(uri, late[1]["request_id"])["request_id"] == late[1]["request_id"]
    assert str(inside) in caplog.text and caplog.text.count("skipped unreadable file") == 1
    assert pl.find_prediction(uri, pl.new_request_id(NOW.replace(minute=40, second=1))) is None
    assert pl.find_prediction(uri, "no-such-id") is None


def test_unknown_and_not_yet_flushed_ids(tmp_path):
    log = pl.PredictionLog(str(tmp_path), flush_seconds=5)
    try:
        with pytest.raises(pl.PredictionNotFound, match="not an id this service issues") as malformed:
            log.find("no-such-id")
        assert malformed.value.retry_after is None
        recent = pl.new_request_id(NOW - dt.timedelta(seconds=3))
        with pytest.raises(pl.PredictionNotFound, match=r"\(yet\).*every 5s; retry in 5s") as not_yet:
            log.find(recent, now=NOW)
        assert not_yet.value.retry_after == 5
        old = pl.new_request_id(NOW - dt.timedelta(hours=2))
        with pytest.raises(pl.PredictionNotFound, match="unknown, or not in the prediction log") as unknown:
            log.find(old, now=NOW)
        assert unknown.value.retry_after is None
    finally:
        log.close()


def test_a_missing_local_folder_is_created_and_a_missing_bucket_is_named(tmp_path, s3_uri):
    pl.check_store(str(tmp_path / "new" / "log"))
    assert (tmp_path / "new" / "log").is_dir()
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' of s3://no-such-bucket/p does not exist"):
        pl.check_store("s3://no-such-bucket/p")


# --------------------------------------------------------------------------------------------
# Two replicas on a real S3 API (moto)


def test_two_replicas_share_one_log_on_s3_and_accept_each_others_feedback(s3_uri, tmp_path, monkeypatch):
    replicas = {}
    for name in ("a", "b"):
        workdir = tmp_path / f"replica-{name}"
        workdir.mkdir()
        monkeypatch.chdir(workdir)  # each replica in its own directory: nothing is shared through disk
        monkeypatch.setenv("HOSTNAME", f"tuneloop-serving-{name}")
        replicas[name] = pl.PredictionLog(s3_uri, flush_seconds=3600, flush_records=100_000)
    a, b = replicas["a"], replicas["b"]
    try:
        served = {name: [record(NOW.replace(minute=m), f"{name}{m}") for m in range(5)] for name in replicas}
        a.log_predictions(served["a"])
        b.log_predictions(served["b"])
        assert a.flush() and b.flush()
        found = b.find(served["a"][2]["request_id"])  # replica B, for a request replica A served
        assert found["model_version"] == "1" and found["predicted_label"] == "ham"
        b.log_feedback(found, "spam", now=NOW.replace(minute=50))
        assert b.flush()
    finally:
        a.close()
        b.close()
    fs, root = pl.filesystem(s3_uri)
    keys = [key.removeprefix(root + "/") for key in fs.find(root)]
    assert sorted(k.split("/")[-1].split("-")[2] for k in keys if k.startswith("predictions/")) == ["a", "b"]
    assert all(k.startswith(("predictions/date=2026-12-01/hour=12/", "feedback/date=2026-12-01/hour=12/")) for k in keys)
    everything = pl.read_log(s3_uri, start=NOW - dt.timedelta(hours=1), end=NOW + dt.timedelta(hours=1))
    assert sorted(everything.frame["text"]) == sorted(r["text"] for rs in served.values() for r in rs)
    assert everything.files_read[0].startswith("s3://tuneloop/")
    feedback = pl.read_feedback(s3_uri)
    assert feedback[["request_id", "label", "predicted_label"]].to_dict("records") == [
        {"request_id": served["a"][2]["request_id"], "label": "spam", "predicted_label": "ham"}]


def test_corrupt_object_in_an_s3_partition_is_skipped_and_named(s3_uri):
    (path,) = pl.append(s3_uri, [record(NOW, "fine")])
    fs, _ = pl.filesystem(s3_uri)
    broken = path.rsplit("/", 1)[0] + "/pod-z-000000-123000000-123000999.parquet"
    fs.pipe_file(broken, b"not parquet")
    read = pl.read_log(s3_uri, start=NOW - dt.timedelta(minutes=5), end=NOW)
    assert list(read.frame["text"]) == ["fine"]
    assert [entry["path"] for entry in read.files_skipped] == [f"s3://{broken}"]


def test_an_s3_outage_loses_no_prediction_and_reads_fail_as_retryable(tmp_path, monkeypatch):
    """Its own moto server, stopped and restarted: the writer keeps records through the outage, a
    read during it is a ServiceUnavailableError (never "no data"), and afterwards every record is there."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from rehearsal.services import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "outage-key",
                        "AWS_SECRET_ACCESS_KEY": "outage-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3fs.S3FileSystem.clear_instance_cache()
    uri = "s3://outage/log"
    try:
        boto3.client("s3").create_bucket(Bucket="outage")
        log = pl.PredictionLog(uri, flush_seconds=0.2, flush_records=100_000)
        log.log_predictions([record(NOW.replace(minute=m), f"before {m}") for m in range(3)])
        assert log.flush()
        server.stop()
        log.log_predictions([record(NOW.replace(minute=10 + m), f"during {m}") for m in range(4)])
        assert not log.flush(timeout=60) and log.predictions.pending == 4
        with pytest.raises(ServiceUnavailableError, match="object store unreachable at s3://outage/log") as down:
            pl.read_log(uri, start=NOW - dt.timedelta(hours=1), end=NOW)
        assert "outage-secret" not in str(down.value) and "\n" not in str(down.value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        log.close()
        assert log.predictions.pending == 0 and log.predictions.dropped == 0
        texts = sorted(pl.read_predictions(uri)["text"])
        assert texts == sorted([f"before {m}" for m in range(3)] + [f"during {m}" for m in range(4)])
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_cluster_refuses_a_pod_local_log(tmp_path, monkeypatch):
    from tests.conftest import make_config

    monkeypatch.delenv(pl.LOG_URI_ENV, raising=False)
    config = make_config(tmp_path, world="cluster")
    with pytest.raises(ConfigError, match=r"deployment.prediction_log_uri: '.*/state/predictions' is pod-local"):
        pl.prediction_log_uri(config)
    config.deployment.prediction_log_uri = "s3://tuneloop/log/"
    assert pl.prediction_log_uri(config) == "s3://tuneloop/log"
    monkeypatch.setenv(pl.LOG_URI_ENV, str(tmp_path / "volume"))
    with pytest.raises(ConfigError, match="is pod-local"):
        pl.prediction_log_uri(config)


def test_a_record_without_its_partition_time_is_refused_at_once(tmp_path):
    writer = pl.LogWriter(str(tmp_path), pl.FEEDBACK, flush_seconds=0.05)
    try:
        with pytest.raises(ValueError, match="needs 'served_at' as a datetime"):
            writer.write([{"request_id": "x", "timestamp": NOW, "served_at": "yesterday"}])
        assert writer.alive and writer.pending == 0
    finally:
        writer.close()


def test_list_files_of_a_window(tmp_path):
    uri = str(tmp_path)
    write_hours(uri)
    (feedback,) = pl.append(uri, [{"request_id": "x", "timestamp": NOW, "served_at": NOW.replace(hour=9)}], pl.FEEDBACK)
    hours = [Path(path).parent.name for path in pl.list_files(uri)]
    assert hours == ["hour=09", "hour=10", "hour=12", "hour=12"]
    assert [Path(p).parent.name for p in pl.list_files(uri, start=NOW.replace(hour=10, minute=0))] == ["hour=10"] + \
        ["hour=12"] * 2
    assert pl.list_files(uri, pl.FEEDBACK) == [feedback]
