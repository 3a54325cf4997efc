"""Checkpoints and resume: a run killed at any step and resumed ends with the uninterrupted weights."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from tests.unit.training_helpers import train_config, weights
from tuneloop import training
from tuneloop.errors import TrainingError
from tuneloop.training.checkpoints import CheckpointStore

RUN = "tuneloop-training-20261201"


class Killed(Exception):
    """Stands for the pod dying right after a step (no chance to write anything more)."""


def kill_at(step: int):
    def hook(global_step: int) -> None:
        if global_step == step:
            raise Killed(step)
    return hook


def config_for(tmp_path, checkpoint, **overrides):
    # 65 train rows, batches of 8: 9 steps per epoch, 18 in all; a checkpoint every 4 steps.
    settings = {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "checkpoint_every_steps": 4, **overrides}
    return train_config(tmp_path, checkpoint, **settings)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint):
    """Weights and summary of one run that nobody killed (dropout on: its RNG must be restored too)."""
    from tests.conftest import make_labelled_frame
    from tuneloop.datasets import assign_split

    root = tmp_path_factory.mktemp("uninterrupted")
    frame = make_labelled_frame()
    frame["split"] = [assign_split(i, validation=0.2, test=0.2, salt="t") for i in frame["id"]]
    frame.to_parquet(root / "dataset.parquet", index=False)
    summary = training.run(config_for(root, tiny_checkpoint), root / "dataset.parquet", root / "model",
                           pipeline_run="reference")
    return weights(root / "model"), summary


@pytest.mark.parametrize("kill_step", [3, 9, 14])  # before any checkpoint, at an epoch end, epoch 2
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_checkpoint, tiny_dataset, uninterrupted, kill_step):
    config = config_for(tmp_path, tiny_checkpoint)
    with pytest.raises(Killed):
        training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, on_step=kill_at(kill_step))
    lines: list[str] = []
    summary = training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, log=lines.append)
    # Checkpoints every 4 steps and after each epoch's validation (step 9 dies before it).
    expected_step = max(4 * (kill_step // 4), 9 if kill_step > 9 else 0)
    assert summary.resumed_from_step == expected_step
    if expected_step:
        assert any("resuming from checkpoint" in line and f"step {expected_step}" in line for line in lines)
    reference_weights, reference = uninterrupted
    resumed = weights(tmp_path / "model")
    assert resumed.keys() == reference_weights.keys()
    for name in reference_weights:
        assert torch.equal(resumed[name], reference_weights[name]), name
    assert [h["validation"] for h in summary.history] == [h["validation"] for h in reference.history]
    metadata = json.loads((tmp_path / "model" / "tuneloop.json").read_text())
    assert metadata["metrics"]["run"]["resumed_from_step"] == expected_step


def test_sigterm_writes_a_checkpoint_and_a_retry_resumes(tmp_path, tiny_checkpoint, tiny_dataset, uninterrupted):
    config = config_for(tmp_path, tiny_checkpoint)

    def terminate_at_step_6(step: int) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingError, match="SIGTERM at step 6; checkpoint .*step-00000006"):
        training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, on_step=terminate_at_step_6)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    summary = training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN)
    assert summary.resumed_from_step == 6
    for name, value in uninterrupted[0].items():
        assert torch.equal(weights(tmp_path / "model")[name], value), name


def test_checkpoints_hold_only_safetensors_and_json_old_ones_are_pruned_all_go_on_success(
        tmp_path, tiny_checkpoint, tiny_dataset):
    config = config_for(tmp_path, tiny_checkpoint, keep_checkpoints=2)
    with pytest.raises(Killed):
        training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, on_step=kill_at(17))
    task_dir = tmp_path / "state" / "checkpoints" / RUN / "finetune"
    steps = sorted(path.name for path in task_dir.iterdir())
    assert steps == ["step-00000012", "step-00000016"]
    suffixes = {path.suffix for path in task_dir.rglob("*") if path.is_file()}
    assert suffixes == {".safetensors", ".json"}
    training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN)
    assert not task_dir.exists(), "a finished model makes its checkpoints unnecessary"


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_reason(tmp_path, tiny_checkpoint, tiny_dataset):
    config = config_for(tmp_path, tiny_checkpoint, keep_checkpoints=3)
    with pytest.raises(Killed):
        training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, on_step=kill_at(13))
    task_dir = tmp_path / "state" / "checkpoints" / RUN / "finetune"
    (task_dir / "step-00000012" / "manifest.json").unlink()  # the writer died before the manifest
    weights_file = task_dir / "step-00000009" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-16] + b"\0" * 16)  # bit rot
    lines: list[str] = []
    summary = training.run(config, tiny_dataset, tmp_path / "model", pipeline_run=RUN, log=lines.append)
    assert any("skipping checkpoint" in line and "step-00000012: partial (no manifest.json" in line for line in lines)
    assert any("step-00000009: model.safetensors does not match its SHA-256" in line for line in lines)
    assert summary.resumed_from_step == 8


def test_a_checkpoint_of_another_config_is_refused_by_name(tmp_path, tiny_checkpoint, tiny_dataset):
    with pytest.raises(Killed):
        training.run(config_for(tmp_path, tiny_checkpoint), tiny_dataset, tmp_path / "m", pipeline_run=RUN,
                     on_step=kill_at(5))
    other = config_for(tmp_path, tiny_checkpoint, learning_rate=2e-3)
    with pytest.raises(TrainingError, match=r"checkpoint .*step-00000004 was written for another model or config "
                                            r"\(learning_rate: 0.001 there, 0.002 here\)"):
        training.run(other, tiny_dataset, tmp_path / "m", pipeline_run=RUN)
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_object_store_uri_and_no_run_name(tmp_path, tiny_checkpoint, tiny_dataset):
    config = config_for(tmp_path, tiny_checkpoint, checkpoint_uri="memory://tuneloop-test/checkpoints", epochs=1)
    with pytest.raises(Killed):
        training.run(config, tiny_dataset, tmp_path / "m", pipeline_run=RUN, on_step=kill_at(5))
    store = CheckpointStore("memory://tuneloop-test/checkpoints", RUN, "finetune")
    assert store.uri(store.prefix) == "memory:///tuneloop-test/checkpoints/" + RUN + "/finetune"
    assert training.run(config, tiny_dataset, tmp_path / "m", pipeline_run=RUN).resumed_from_step == 4
    no_key = config_for(tmp_path / "fresh", tiny_checkpoint, epochs=1)
    assert training.run(no_key, tiny_dataset, tmp_path / "n").resumed_from_step == 0
    assert not (tmp_path / "fresh" / "state" / "checkpoints").exists()
