"""Checks of the trained frame (the point-in-time frame finetune receives): GX suite, near-duplicates
across splits, relabelled ids and texts, the lineage fingerprint, and the pipeline hook."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_config, make_labelled_frame
from tuneloop import frame_checks
from tuneloop.datasets import fingerprint_frame
from tuneloop.errors import DataValidationError


def trained_frame(rows: int = 120) -> pd.DataFrame:
    """A trained frame: every third row held out, texts unique (the shared frame numbers them)."""
    frame = make_labelled_frame(rows)
    frame["split"] = ["test" if i % 6 == 0 else "validation" if i % 6 == 3 else "train" for i in range(rows)]
    return frame


def write(frame: pd.DataFrame, folder: Path) -> Path:
    path = folder / "dataset.parquet"
    frame.to_parquet(path, index=False)
    return path


def run(tmp_path: Path, frame: pd.DataFrame, **validation):
    config = make_config(tmp_path, validation={"min_rows": 10, "min_rows_per_class": 5, **validation})
    return frame_checks.run(config, write(frame, tmp_path), tmp_path / "report.html", tmp_path / "result.json")


def test_normalisation_and_shingles():
    assert frame_checks.normalise("  WINNER!!  Call\u00a0NOW... ") == "winner call now"
    assert frame_checks.shingles("abc") == {"abc"}
    assert frame_checks.shingles("abcdef") == {"abcde", "bcdef"}


def test_a_clean_frame_passes_and_its_fingerprint_is_the_lineage(tmp_path):
    frame = trained_frame()
    summary = run(tmp_path, frame)
    assert summary.success and summary.rows == 120 and summary.relabelled == 0
    assert summary.fingerprint == fingerprint_frame(frame)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["fingerprint"] == summary.fingerprint and result["splits"]["train"] == 80
    names = [check["expectation"] for check in result["expectations"]]
    assert "tuneloop_near_duplicates_across_splits" in names and len(names) > 5  # the GX suite ran on it
    assert "Trained frame validation passed" in (tmp_path / "report.html").read_text()


def test_near_duplicates_across_splits_fail_above_the_share_and_are_named(tmp_path):
    frame = trained_frame()
    held_out = frame.index[frame["split"] != "train"][:6]
    train_rows = frame.index[frame["split"] == "train"][:6]
    for target, source in zip(held_out, train_rows):  # one character apart from a train text
        text = frame.at[source, "text"]
        frame.at[target, "text"] = text[:-1] + ("x" if text[-1] != "x" else "y")
    with pytest.raises(DataValidationError) as raised:
        run(tmp_path, frame, max_near_duplicate_share=0.1)
    (failure,) = raised.value.failures
    assert "15.0% of validation and test rows (6 of 40) have a near-duplicate in the train split" in failure
    assert str(frame.at[held_out[0], "id"]) in failure
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["success"] is False and result["near_duplicates"]["rows"] == 6
    pair = result["near_duplicates"]["examples"][0]
    assert pair["train_id"] in set(frame.loc[train_rows, "id"]) and pair["similarity"] >= 0.8
    assert "Trained frame validation failed" in (tmp_path / "report.html").read_text()
    assert run(tmp_path, frame, max_near_duplicate_share=0.2).near_duplicate_share == pytest.approx(0.15)


def test_texts_that_only_look_alike_are_not_near_duplicates(tmp_path):
    frame = trained_frame()
    frame["text"] = [f"message number {i} about topic {i * 7919 % 104729}" for i in range(len(frame))]
    assert frame_checks.near_duplicates(frame, make_config(tmp_path, validation={"near_duplicate_similarity": 0.9})) \
        == []


def test_relabelled_ids_and_texts_are_reported_not_failed(tmp_path):
    frame = trained_frame()
    frame.loc[1, "text"] = frame.loc[2, "text"]
    frame.loc[1, "label"], frame.loc[2, "label"] = "spam", "ham"
    frame.loc[1, "split"] = frame.loc[2, "split"] = "train"
    summary = run(tmp_path, frame)
    assert summary.success and summary.relabelled == 1
    (entry,) = json.loads((tmp_path / "result.json").read_text())["relabelled"]["examples"]
    assert entry["by"] == "text" and entry["labels"] == ["ham", "spam"]


def test_the_component_returns_the_frame_fingerprint(tmp_path):
    from kfp.dsl import HTML, Artifact, Dataset

    from components.frame_checks import validate_frame

    frame = trained_frame()
    dataset = Dataset(uri="file://dataset")
    dataset.path = str(write(frame, tmp_path))
    report, result = HTML(uri="file://report"), Artifact(uri="file://result")
    report.path, result.path = str(tmp_path / "report.html"), str(tmp_path / "result.json")
    config = make_config(tmp_path, validation={"min_rows": 10, "min_rows_per_class": 5})
    outputs = validate_frame.python_func(config_json=config.to_json(), dataset=dataset, report=report, result=result)
    assert outputs.fingerprint == fingerprint_frame(frame) and outputs.rows == 120
    assert result.metadata["fingerprint"] == outputs.fingerprint


def test_finetune_records_the_trained_frames_fingerprint(tmp_path):
    import yaml

    from tests.pipelines.conftest import cluster_config
    from tuneloop.orchestration import compile_pipeline

    output = compile_pipeline(Path(__file__).resolve().parents[2] / "pipelines" / "training.py",
                              tmp_path / "training.yaml", cluster_config())
    spec = next(yaml.safe_load_all(output.read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    check = tasks["validate-frame"]
    assert check["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "retrieve-features"
    fingerprint = tasks["finetune"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
    assert fingerprint == {"producerTask": "validate-frame", "outputParameterKey": "fingerprint"}
