"""training.processes: 2 DDP processes on CPU (gloo) give the one-process result at the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.training_helpers import tiny_checkpoint_without_dropout, train_config, weights
from tuneloop import training
from tuneloop.errors import ConfigError
from tuneloop.training import distributed


def test_two_processes_match_one(tmp_path, tiny_dataset):
    checkpoint = tiny_checkpoint_without_dropout(tmp_path / "tiny")
    # An odd global batch (7) leaves the ranks uneven shares and a last batch of 2 rows: still exact.
    common = {"epochs": 2, "batch_size": 7, "learning_rate": 1e-3, "warmup_ratio": 0.0, "class_weights": "balanced",
              "torch_threads": 1}
    one = training.run(train_config(tmp_path, checkpoint, **common), tiny_dataset, tmp_path / "one")
    two = training.run(train_config(tmp_path, checkpoint, processes=2, keep_checkpoints_on_success=True, **common),
                       tiny_dataset, tmp_path / "two", pipeline_run="ddp-run")
    assert two.processes == 2 and one.processes == 1
    single, parallel = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in single:
        assert torch.allclose(single[name], parallel[name], atol=1e-5), name
    assert two.validation_metrics["macro_f1"] == one.validation_metrics["macro_f1"]
    assert [round(h["train_loss"], 5) for h in two.history] == [round(h["train_loss"], 5) for h in one.history]
    assert json.loads((tmp_path / "two" / "tuneloop.json").read_text())["metrics"]["run"]["processes"] == 2
    # Only rank 0 wrote: one set of checkpoints, each holding both ranks' RNG states.
    steps = sorted((tmp_path / "state" / "checkpoints" / "ddp-run" / "finetune").iterdir())
    assert steps and all((step / "manifest.json").is_file() for step in steps)
    from safetensors.torch import load_file

    assert {"rank0.torch_cpu", "rank1.torch_cpu"} <= set(load_file(steps[-1] / "rng.safetensors"))


def test_more_processes_than_cores_is_refused(tmp_path, tiny_checkpoint, tiny_dataset, monkeypatch):
    monkeypatch.setattr(distributed, "available_slots", lambda: (2, "CPU cores (no GPU)"))
    config = train_config(tmp_path, tiny_checkpoint, processes=3)
    with pytest.raises(ConfigError, match=r"training.processes 3 is more than the 2 CPU cores \(no GPU\)"):
        training.run(config, tiny_dataset, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_rank_error_comes_back_as_the_same_error(tmp_path, tiny_checkpoint, tiny_dataset):
    from tuneloop.errors import DataError

    bad = train_config(tmp_path, tiny_checkpoint, processes=2)
    bad.data.classes = ["ham", "eggs"]
    with pytest.raises(DataError, match="labels outside data.classes"):
        training.run(bad, tiny_dataset, tmp_path / "m")
