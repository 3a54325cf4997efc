"""tuneloop run --local --resume RUN: finished steps reused after a fingerprint check, the rest re-run."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import make_config, make_labelled_frame
from tuneloop.errors import PipelineError
from tuneloop.orchestration import run_local

PIPELINE = textwrap.dedent('''
    """A two-step pipeline: prepare (reads the data file) -> train (fails while a flag file exists)."""
    import os

    from kfp import dsl
    from kfp.dsl import Dataset, Input, Model, Output


    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def prepare(config_json: str, prepared: Output[Dataset]):
        import json, os
        from pathlib import Path

        data = json.loads(config_json)["data"]["texts"]
        counter = Path(os.environ["RESUME_TEST_DIR"]) / "prepare-runs"
        counter.write_text(str(int(counter.read_text() if counter.exists() else 0) + 1))
        Path(prepared.path).write_text(str(len(Path(data).read_bytes())))


    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def train(prepared: Input[Dataset], model: Output[Model], pipeline_run: str = ""):
        import os
        from pathlib import Path

        if (Path(os.environ["RESUME_TEST_DIR"]) / "fail").exists():
            raise RuntimeError("tuneloop.errors.TrainingError: killed during training")
        checkpoint_run = os.environ.get("TUNELOOP_CHECKPOINT_RUN", "")
        Path(model.path).write_text(Path(prepared.path).read_text() + " " + checkpoint_run)


    @dsl.pipeline(name="resume-test")
    def resume_test(config_json: str, base_model: str = "", epochs: int = 0, learning_rate: float = 0.0):
        prepared = prepare(config_json=config_json)
        train(prepared=prepared.outputs["prepared"], pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
''')


def test_resume_reuses_verified_steps_and_reruns_the_rest(tmp_path, tiny_checkpoint, monkeypatch):
    frame = make_labelled_frame(30)
    frame[["id", "event_timestamp", "text"]].to_parquet(tmp_path / "texts.parquet")
    frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet")
    config = make_config(tmp_path, training={"base_model": str(tiny_checkpoint)})
    pipeline_file = tmp_path / "pipelines" / "resume_test.py"
    pipeline_file.parent.mkdir()
    pipeline_file.write_text(PIPELINE)
    monkeypatch.setenv("RESUME_TEST_DIR", str(tmp_path))
    (tmp_path / "fail").touch()
    with pytest.raises(PipelineError):
        run_local(config, pipeline_file)
    root = tmp_path / "state" / "pipeline_root"
    (failed,) = [p for p in root.iterdir() if p.is_dir()]
    (tmp_path / "fail").unlink()

    resumed = run_local(config, pipeline_file, resume=failed.name)
    assert (tmp_path / "prepare-runs").read_text() == "1", "prepare was reused, not executed again"
    assert resumed.resume_lines[0] == f"resume of {failed.name}: reused prepare (output fingerprints verified)"
    assert resumed.resume_lines[1] == f"resume: train ran again (it did not finish in {failed.name})"
    model = (resumed.root / "train" / "model").read_text()
    assert model.endswith(failed.name), "the resumed step keys its checkpoints by the resumed run"
    assert (resumed.root / "prepare" / "prepared").is_file(), "reused outputs are part of the new run"

    # A changed input is not trusted: prepare runs again.
    frame.head(20)[["id", "event_timestamp", "text"]].to_parquet(tmp_path / "texts.parquet")
    again = run_local(config, pipeline_file, resume=failed.name)
    assert (tmp_path / "prepare-runs").read_text() == "2"
    assert "resume: prepare ran again (its inputs changed)" in again.resume_lines

    # A tampered output is not trusted either.
    (again.root / "prepare" / "prepared").unlink()
    (again.root / "prepare" / "prepared").write_text("tampered")
    third = run_local(config, pipeline_file, resume=again.name)
    assert "resume: prepare ran again (its output prepared changed since it was written)" in third.resume_lines


def test_unknown_resume_run_is_one_clear_error(tmp_path, tiny_checkpoint, monkeypatch):
    frame = make_labelled_frame(30)
    frame[["id", "event_timestamp", "text"]].to_parquet(tmp_path / "texts.parquet")
    frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet")
    config = make_config(tmp_path, training={"base_model": str(tiny_checkpoint)})
    with pytest.raises(PipelineError, match=r"--resume no-such-run: no local run of that name under .*pipeline_root "
                                            r"\(latest: none\)"):
        run_local(config, "training", resume="no-such-run")


def test_finetune_step_keeps_the_resumed_runs_checkpoints(tmp_path, tiny_checkpoint, tiny_dataset, monkeypatch):
    from tests.unit.training_helpers import train_config
    from tuneloop import training
    from tuneloop.local_resume import CHECKPOINT_RUN_ENV

    config = train_config(tmp_path, tiny_checkpoint, batch_size=8, checkpoint_every_steps=2)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.run(config, tiny_dataset, tmp_path / "m", pipeline_run="old-run", on_step=crash)
    monkeypatch.setenv(CHECKPOINT_RUN_ENV, "old-run")
    summary = training.finetune_step(config, tiny_dataset, tmp_path / "m", pipeline_run="new-run")
    assert summary.resumed_from_step == 4
