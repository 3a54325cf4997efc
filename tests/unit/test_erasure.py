"""Erasure with lineage (tuneloop forget): sources, prediction log, registry tags, audit, repeats."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from tests.conftest import make_config
from tuneloop import erasure, prediction_log, privacy, registry
from tuneloop.artifacts import write_metadata
from tuneloop.cli import cli
from tuneloop.config import ErasureConfig
from tuneloop.datasets import assign_split

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sms_spam" / "data"
BLESSED = {"blessed": True, "checks": [], "test_metrics": {"accuracy": 0.97, "macro_f1": 0.95, "rows": 10}}
ROWS = 200


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The first ROWS rows of the example data, a config as a file, a tmp MLflow store with two versions
    (v1 trained on rows 100.., v2 the champion trained on all rows), and a prediction log holding the
    texts of rows 0..4 served raw (before masking existed) and masked."""
    monkeypatch.delenv(prediction_log.LOG_URI_ENV, raising=False)
    texts = pd.read_parquet(EXAMPLE / "texts.parquet").head(ROWS)
    labels = pd.read_parquet(EXAMPLE / "labels.parquet").head(ROWS)
    texts.to_parquet(tmp_path / "texts.parquet", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    config = make_config(tmp_path, data={"texts": str(tmp_path / "texts.parquet"),
                                         "labels": str(tmp_path / "labels.csv"), "classes": ["ham", "spam"]})
    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(config.model_dump_json())  # JSON is YAML
    frame = texts.merge(labels[["id", "label"]], on="id")
    frame["split"] = [assign_split(key, validation=0.2, test=0.2, salt="t") for key in frame["id"]]
    compressed = tmp_path / "compressed"
    write_metadata(compressed, {"kind": "compressed_model", "runtime": "onnxruntime", "precision": "int8",
                                "labels": ["ham", "spam"], "base_model": "tiny", "data_fingerprint": "f00d"})
    (compressed / "model.onnx").write_bytes(b"onnx bytes")
    for run, rows in (("run-1", frame.iloc[100:]), ("run-2", frame)):
        path = tmp_path / f"{run}.parquet"
        rows.to_parquet(path, index=False)
        registry.register(config, compressed, BLESSED, path, pipeline_run=run)
    assert registry.alias_version(config, registry.CHAMPION) == "2"

    masked = privacy.scanner(config.privacy).mask
    served = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    records = []
    for index, text in enumerate(texts["text"].head(5).tolist() + ["someone else entirely"]):
        for form in {text, masked(text)}:
            when = served + dt.timedelta(seconds=len(records))
            records.append({"request_id": prediction_log.new_request_id(when), "timestamp": when,
                            "model_version": "2", "text": form, "predicted_label": "ham", "confidence": 0.9})
    log_uri = prediction_log.prediction_log_uri(config)
    prediction_log.append(log_uri, records)
    feedback = [{"request_id": r["request_id"], "timestamp": r["timestamp"], "served_at": r["timestamp"],
                 "label": "ham", "model_version": "2", "predicted_label": "ham"} for r in records]
    prediction_log.append(log_uri, feedback, kind=prediction_log.FEEDBACK)
    return {"config": config, "file": config_file, "texts": texts, "records": records, "log": log_uri,
            "tmp": tmp_path}


def _forget(project, tmp_path, *, ids=None, texts=None):
    option, values = ("--ids", ids) if ids is not None else ("--texts", texts)
    request = tmp_path / f"request-{len(list(tmp_path.glob('request-*')))}.txt"
    request.write_text("\n".join(values) + "\n")
    return CliRunner().invoke(cli, ["forget", "--config", str(project["file"]), option, str(request)])


def _log_bytes(uri: str) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(Path(uri).rglob("*.parquet")))


def test_forget_ids_from_the_example_removes_them_everywhere_and_flags_the_champion(project, tmp_path):
    config, texts = project["config"], project["texts"]
    erased_ids = texts["id"].head(5).tolist()
    erased_texts = texts["text"].head(5).tolist()
    before = prediction_log.read_predictions(project["log"])

    result = _forget(project, tmp_path, ids=erased_ids)
    assert result.exit_code == 0, result.output
    assert f"{erased_ids[0]}: erased" in result.output
    assert "registry versions trained on erased data: 2" in result.output

    # sources: a new version without the rows, the format kept
    new_texts = pd.read_parquet(tmp_path / "texts.parquet")
    new_labels = pd.read_csv(tmp_path / "labels.csv")
    assert len(new_texts) == ROWS - 5 and not set(erased_ids) & set(new_texts["id"])
    assert len(new_labels) == ROWS - 5 and not set(erased_ids) & set(new_labels["id"].astype(str))
    # prediction log: raw (pre-masking) and masked records of those texts, and their feedback, are gone
    after = prediction_log.read_predictions(project["log"])
    assert len(before) - len(after) == len([r for r in project["records"] if r["text"] != "someone else entirely"])
    assert after["text"].tolist() == ["someone else entirely"]
    assert prediction_log.read_feedback(project["log"])["request_id"].tolist() == after["request_id"].tolist()
    raw = _log_bytes(project["log"])
    assert not any(text.encode() in raw for text in erased_texts)
    # registry: the champion (trained on them) is flagged, v1 (trained without them) is not
    listed = CliRunner().invoke(cli, ["models", "list", "--config", str(project["file"])])
    lines = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert "champion" in lines["2"] and "[trained on erased data]" in lines["2"]
    assert "[trained on erased data]" not in lines["1"]
    # the audit log: hashed ids, never ids or texts
    entries = erasure.audit_entries(config)
    assert len(entries) == 1 and entries[0]["status"] == "done" and entries[0]["subjects"] == 5
    summary = json.loads(entries[0]["summary"])
    assert summary["tagged_versions"] == ["2"] and summary["source_rows_removed"] == {"texts.parquet": 5,
                                                                                      "labels.csv": 5}
    database = (Path(config.state_dir) / "state.db").read_bytes()
    for path in Path(config.state_dir).glob("state.db*"):
        database += path.read_bytes()
    assert not any(key.encode() in database for key in erased_ids)
    assert not any(text[:30].encode() in database for text in erased_texts)
    # the next training run excludes them, even if a backup brought them back
    restored = pd.DataFrame({"id": texts["id"].head(10), "text": texts["text"].head(10)})
    kept, removed = erasure.exclude_erased(restored, config)
    assert removed == 5 and kept["id"].tolist() == texts["id"].iloc[5:10].tolist()


def test_running_it_twice_does_nothing_the_second_time(project, tmp_path):
    erased_ids = project["texts"]["id"].head(3).tolist()
    assert _forget(project, tmp_path, ids=erased_ids).exit_code == 0
    watched = [tmp_path / "texts.parquet", tmp_path / "labels.csv", *Path(project["log"]).rglob("*.parquet")]
    stamps = {path: path.stat().st_mtime_ns for path in watched}
    again = _forget(project, tmp_path, ids=erased_ids)
    assert again.exit_code == 0, again.output
    assert "already done, nothing to do" in again.output
    assert f"{erased_ids[0]}: already erased" in again.output
    assert {path: path.stat().st_mtime_ns for path in watched} == stamps
    assert len(erasure.audit_entries(project["config"])) == 1


def test_ids_that_match_nothing_are_reported_per_id_with_their_own_exit_code(project, tmp_path):
    known = project["texts"]["id"].iloc[7]
    result = _forget(project, tmp_path, ids=[known, "no-such-id", "another-unknown"])
    assert result.exit_code == erasure.EXIT_UNMATCHED == 13
    assert f"{known}: erased" in result.output
    assert "no-such-id: matched nothing" in result.output and "another-unknown: matched nothing" in result.output
    assert "error: 2 of 3 given ids matched nothing: no-such-id, another-unknown" in result.output
    # the unknown ids were not recorded as erased: asked again, alone or in the same request, still reported
    again = _forget(project, tmp_path, ids=["no-such-id"])
    assert again.exit_code == 13 and "no-such-id: matched nothing" in again.output
    repeated = _forget(project, tmp_path, ids=[known, "no-such-id", "another-unknown"])
    assert repeated.exit_code == 13 and f"{known}: already erased" in repeated.output
    assert "another-unknown: matched nothing" in repeated.output


def test_forget_by_text_and_by_request_id(project, tmp_path):
    texts = project["texts"]
    result = _forget(project, tmp_path, texts=[texts["text"].iloc[0]])
    assert result.exit_code == 0, result.output
    assert "text #1: erased" in result.output and texts["text"].iloc[0] not in result.output
    assert texts["id"].iloc[0] not in set(pd.read_parquet(tmp_path / "texts.parquet")["id"])

    other = next(r for r in project["records"] if r["text"] == "someone else entirely")
    result = _forget(project, tmp_path, ids=[other["request_id"]])
    assert result.exit_code == 0, result.output
    assert other["request_id"] not in set(prediction_log.read_predictions(project["log"])["request_id"])
    assert len(pd.read_parquet(tmp_path / "texts.parquet")) == ROWS - 1  # a request id touches no source


def test_archive_mode_keeps_the_retired_version_where_the_config_says(project, tmp_path):
    config = project["config"].model_copy(deep=True)
    config.privacy.erasure = ErasureConfig(retired_sources="archive", archive_uri=str(tmp_path / "archive"))
    report = erasure.forget(config, ids=[project["texts"]["id"].iloc[0]])
    archived = sorted((tmp_path / "archive" / report.audit_id).iterdir())
    assert [path.name for path in archived] == ["labels.csv", "texts.parquet"]
    assert len(pd.read_parquet(archived[1])) == ROWS


@pytest.mark.parametrize("content, message", [(None, "ids file not found"), ("\n  \n", "holds no ids")])
def test_bad_request_files_are_one_line_errors(project, tmp_path, content, message):
    request = tmp_path / "ids.txt"
    if content is not None:
        request.write_text(content)
    with pytest.raises(erasure.ForgetError, match=message) as caught:
        erasure.read_subjects(request, what="ids")
    assert "\n" not in str(caught.value) and caught.value.exit_code == 3
    both = CliRunner().invoke(cli, ["forget", "--config", str(project["file"])])
    assert both.exit_code == 2 and "exactly one of --ids FILE or --texts FILE" in both.output


def test_forget_on_the_object_store_rewrites_sources_and_the_shared_log(tmp_path, s3_endpoint, monkeypatch):
    """The cluster world: sources and prediction log on s3://, the same erasure."""
    monkeypatch.delenv(prediction_log.LOG_URI_ENV, raising=False)
    prefix = f"s3://tuneloop/erasure-{tmp_path.name}"
    texts = pd.read_parquet(EXAMPLE / "texts.parquet").head(50)
    labels = pd.read_parquet(EXAMPLE / "labels.parquet").head(50)
    texts.to_parquet(f"{prefix}/texts.parquet", index=False)
    labels.to_parquet(f"{prefix}/labels.parquet", index=False)
    config = make_config(tmp_path, data={"texts": f"{prefix}/texts.parquet", "labels": f"{prefix}/labels.parquet",
                                         "classes": ["ham", "spam"]},
                         deployment={"prediction_log_uri": f"{prefix}/log"})
    served = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    records = [{"request_id": prediction_log.new_request_id(served + dt.timedelta(seconds=i)),
                "timestamp": served + dt.timedelta(seconds=i), "model_version": "1", "text": text,
                "predicted_label": "ham", "confidence": 0.9} for i, text in enumerate(texts["text"].head(4))]
    prediction_log.append(f"{prefix}/log", records)

    report = erasure.forget(config, ids=texts["id"].head(2).tolist())
    assert report.exit_code == 0 and report.source_rows_removed == {"texts.parquet": 2, "labels.parquet": 2}
    assert report.log_records_removed == {"predictions": 2, "feedback": 0}
    remaining = pd.read_parquet(f"{prefix}/texts.parquet")
    assert len(remaining) == 48 and not set(texts["id"].head(2)) & set(remaining["id"])
    assert prediction_log.read_predictions(f"{prefix}/log")["text"].tolist() == texts["text"].iloc[2:4].tolist()
    assert erasure.forget(config, ids=texts["id"].head(2).tolist()).already_done
