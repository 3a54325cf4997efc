"""The validation stage: the Great Expectations suite on tiny labelled frames."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.conftest import make_config, make_labelled_frame
from tuneloop import validation
from tuneloop.datasets import fingerprint_frame
from tuneloop.errors import DataError, DataValidationError

REASONS = [
    "schema: required columns exist",
    "every label has a text",
    "no empty text",
    "text length bounds",
    "labels from the known set",
    "unique ids",
    "at least 100 rows",
    "at least 10 rows per class",
]


def write_data(tmp_path: Path, frame: pd.DataFrame, *, texts: pd.DataFrame | None = None) -> None:
    """Texts and labels files from a flat labelled frame (texts may be given separately)."""
    texts = frame[["id", "event_timestamp", "text"]] if texts is None else texts
    texts.to_parquet(tmp_path / "texts.parquet", index=False)
    frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet", index=False)


def run(tmp_path: Path, config=None):
    config = config or make_config(tmp_path)
    return validation.run(config, tmp_path / "out" / "report.html", tmp_path / "out" / "result.json")


def failures_of(tmp_path: Path, frame: pd.DataFrame, config=None, **write) -> list[str]:
    """Write the frame, run validation, expect it to fail; the failure lines."""
    write_data(tmp_path, frame, **write)
    with pytest.raises(DataValidationError) as caught:
        run(tmp_path, config)
    error = caught.value
    assert error.stage == "validation"
    assert f"data validation failed: {len(error.failures)} of 8 expectations failed" in error.message
    assert str(tmp_path / "labels.parquet") in error.message
    return error.failures


def result_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "result.json").read_text())


def test_clean_frame_passes_and_writes_reports(tmp_path, labelled_frame, capsys):
    write_data(tmp_path, labelled_frame)
    summary = run(tmp_path)
    assert summary == validation.ValidationSummary(
        rows=120, class_counts={"ham": 80, "spam": 40}, fingerprint=summary.fingerprint, success=True, expectations=8
    )
    result = result_json(tmp_path)
    assert result["success"] is True and result["rows"] == 120
    assert result["class_counts"] == {"ham": 80, "spam": 40}
    assert result["fingerprint"] == summary.fingerprint
    assert summary.fingerprint == fingerprint_frame(validation.load_labelled_frame(make_config(tmp_path)))
    assert [check["reason"] for check in result["expectations"]] == REASONS
    assert all(check["success"] and check["failure"] is None for check in result["expectations"])
    assert {check["expectation"] for check in result["expectations"]} >= {
        "expect_column_values_to_be_in_set", "expect_column_values_to_be_unique", "expect_column_values_to_be_between"
    }
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "passed" in report and "labels from the known set" in report
    assert "<script" not in report and "http" not in report  # self-contained
    assert "[validation]" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["texts.parquet", "labels.parquet"])
def test_missing_data_file_names_the_path(tmp_path, labelled_frame, missing):
    write_data(tmp_path, labelled_frame)
    (tmp_path / missing).unlink()
    with pytest.raises(DataError) as caught:
        run(tmp_path)
    assert not isinstance(caught.value, DataValidationError)
    assert str(tmp_path / missing) in str(caught.value) and "not found" in str(caught.value)
    assert caught.value.stage == "validation"
    assert result_json(tmp_path)["success"] is False
    assert "not found" in (tmp_path / "out" / "report.html").read_text()


def test_labels_file_without_label_column_names_the_column(tmp_path, labelled_frame):
    write_data(tmp_path, labelled_frame)
    labelled_frame[["id", "event_timestamp"]].to_parquet(tmp_path / "labels.parquet", index=False)
    with pytest.raises(DataError) as caught:
        run(tmp_path)
    assert "'label'" in caught.value.message and str(tmp_path / "labels.parquet") in caught.value.message
    assert caught.value.field == "label"


def test_unknown_label_values_are_named(tmp_path, labelled_frame):
    frame = labelled_frame.assign(label=labelled_frame.label.where(labelled_frame.index % 40 != 1, "maybe"))
    [failure] = failures_of(tmp_path, frame)
    assert failure == (
        "labels from the known set: column 'label' has 3 unexpected values ['maybe'] (known: ['ham', 'spam'])"
    )


def test_too_many_empty_or_whitespace_texts(tmp_path, labelled_frame):
    frame = labelled_frame.copy()
    frame.loc[frame.index % 5 < 2, "text"] = ["   ", "", "\t\n", None] * 12
    [failure] = failures_of(tmp_path, frame)
    assert failure.startswith("no empty text: 40% of 'text' values are empty or whitespace")
    assert "allowed 1%" in failure


def test_empty_texts_within_the_allowance_pass_and_skip_the_length_bound(tmp_path, labelled_frame):
    frame = labelled_frame.copy()
    frame.loc[[3, 4], "text"] = ["", "  "]
    write_data(tmp_path, frame)
    config = make_config(tmp_path, validation={"max_empty_text_share": 0.02, "min_text_length": 5})
    assert run(tmp_path, config).success


def test_text_length_bounds(tmp_path, labelled_frame):
    frame = labelled_frame.copy()
    frame.loc[5, "text"] = "x" * 300
    config = make_config(tmp_path, validation={"max_text_length": 200})
    [failure] = failures_of(tmp_path, frame, config)
    assert failure == "text length bounds: 1 of 120 'text' values are not 1..200 characters long (lengths [300])"


def test_duplicate_ids(tmp_path, labelled_frame):
    frame = pd.concat([labelled_frame, labelled_frame.iloc[[4, 4]]], ignore_index=True)
    texts = labelled_frame[["id", "event_timestamp", "text"]]
    [failure] = failures_of(tmp_path, frame, texts=texts)
    assert failure == "unique ids: column 'id' has 3 rows sharing 1 repeated ids ['m00004']"


def test_label_without_text_fails(tmp_path, labelled_frame):
    texts = labelled_frame[["id", "event_timestamp", "text"]].drop(index=[7, 8])
    [failure] = failures_of(tmp_path, labelled_frame, texts=texts)
    assert failure.startswith("every label has a text: column 'text' is null for 2 of 120 labels")
    assert "['m00007', 'm00008']" in failure


def test_latest_text_of_an_id_is_used(tmp_path, labelled_frame):
    texts = labelled_frame[["id", "event_timestamp", "text"]]
    older = texts.iloc[[0]].assign(text="   ", event_timestamp=texts.event_timestamp.iloc[0] - pd.Timedelta(days=1))
    write_data(tmp_path, labelled_frame, texts=pd.concat([texts, older], ignore_index=True))
    assert run(tmp_path).rows == 120


def test_too_few_rows(tmp_path):
    [failure] = failures_of(tmp_path, make_labelled_frame(30))
    assert failure == "at least 100 rows: found 30 rows, need at least 100"


def test_too_few_rows_for_one_class(tmp_path, labelled_frame):
    frame = labelled_frame[(labelled_frame.label == "ham") | (labelled_frame.index < 9)]
    config = make_config(tmp_path, validation={"min_rows": 50})
    [failure] = failures_of(tmp_path, frame, config)
    assert failure == "at least 10 rows per class: column 'label': 'spam' has 3 (need at least 10 rows per class)"


def test_every_failure_is_listed_and_reports_are_written(tmp_path):
    frame = make_labelled_frame(30)
    frame.loc[1, "label"] = "maybe"
    failures = failures_of(tmp_path, frame)
    assert [line.split(":")[0] for line in failures] == ["labels from the known set", "at least 100 rows"]
    result = result_json(tmp_path)
    assert result["success"] is False and result["rows"] == 30
    failed = [check for check in result["expectations"] if not check["success"]]
    assert [check["observed"] for check in failed] == [["maybe"], 30]
    assert failed[0]["column"] == "label" and failed[0]["examples"] == [{"label": "maybe", "id": "m00001"}]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "FAIL" in report and "failed" in report and "maybe" in report


def test_three_classes(tmp_path, labelled_frame):
    frame = labelled_frame.assign(label=[("ham", "spam", "promo")[i % 3] for i in range(120)])
    write_data(tmp_path, frame)
    data = {"texts": "texts.parquet", "labels": "labels.parquet", "classes": ["ham", "spam", "promo"]}
    summary = run(tmp_path, make_config(tmp_path, data=data))
    assert summary.class_counts == {"ham": 40, "spam": 40, "promo": 40}


def test_a_known_class_without_rows_fails(tmp_path, labelled_frame):
    data = {"texts": "texts.parquet", "labels": "labels.parquet", "classes": ["ham", "spam", "promo"]}
    [failure] = failures_of(tmp_path, labelled_frame, make_config(tmp_path, data=data))
    assert "'promo' has 0" in failure


def test_csv_labels_are_compared_as_strings(tmp_path, labelled_frame):
    frame = labelled_frame.assign(label=(labelled_frame.label == "spam").astype(int), id=range(120))
    frame[["id", "event_timestamp", "text"]].to_csv(tmp_path / "texts.csv", index=False)
    frame[["id", "event_timestamp", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    data = {"texts": "texts.csv", "labels": "labels.csv", "classes": ["0", "1"]}
    summary = run(tmp_path, make_config(tmp_path, data=data))
    assert summary.class_counts == {"0": 80, "1": 40}


def test_component_returns_rows_and_fingerprint(tmp_path, labelled_frame):
    from components.validation import validate_data

    write_data(tmp_path, labelled_frame)
    report = SimpleNamespace(path=str(tmp_path / "report.html"), metadata={})
    result = SimpleNamespace(path=str(tmp_path / "result.json"), metadata={})
    outputs = validate_data.python_func(config_json=make_config(tmp_path).to_json(), report=report, result=result)
    assert outputs.rows == 120 and outputs.fingerprint == result.metadata["fingerprint"]
    assert Path(report.path).is_file() and json.loads(Path(result.path).read_text())["success"]


def test_an_expectation_gx_could_not_evaluate_is_a_failure():
    flat = {"raised_exception": True, "exception_message": "boom", "exception_traceback": "..."}
    keyed = {"MetricConfigurationID(...)": flat, "other": {"raised_exception": False}}
    assert validation._exception_message(flat) == validation._exception_message(keyed) == "boom"
    assert validation._exception_message({"raised_exception": False, "exception_message": None}) is None


def test_data_on_the_object_store_validates_like_local_files(tmp_path, labelled_frame, s3_endpoint):
    """data.texts / data.labels as s3:// URIs (the cluster world) read exactly as the local files do."""
    write_data(tmp_path, labelled_frame)
    local = validation.load_labelled_frame(make_config(tmp_path))
    for name in ("texts", "labels"):
        pd.read_parquet(tmp_path / f"{name}.parquet").to_parquet(f"s3://tuneloop/validation/{name}.parquet")
    remote = make_config(tmp_path, data={"texts": "s3://tuneloop/validation/texts.parquet",
                                         "labels": "s3://tuneloop/validation/labels.parquet",
                                         "classes": ["ham", "spam"]})

    pd.testing.assert_frame_equal(validation.load_labelled_frame(remote), local)
    summary = validation.run(remote, tmp_path / "s3out" / "report.html", tmp_path / "s3out" / "result.json")
    assert summary.rows == len(labelled_frame)
    with pytest.raises(DataError, match="labels file not found: s3://tuneloop/validation/nowhere.csv"):
        validation.run(remote.model_copy(update={"data": remote.data.model_copy(
            update={"labels": "s3://tuneloop/validation/nowhere.csv"})}), tmp_path / "x.html", tmp_path / "x.json")
