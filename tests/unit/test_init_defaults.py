"""`tuneloop init` writes defaults that fit the data: text lengths, max_length, no absolute threshold."""

from __future__ import annotations

import pandas as pd

from tests.conftest import make_config
from tuneloop import validation
from tuneloop.config import load_config
from tuneloop.project import derive_defaults, init_project


def test_init_derives_lengths_from_the_data_and_long_documents_pass_validation(tmp_path):
    short = [f"a short note about topic {i % 4} number {i}" for i in range(150)]
    long_documents = [("a long article about topic 2 " * 500)[: 12_000 + i] for i in range(3)]
    frame = pd.DataFrame({"text": short + long_documents,
                          "topic": [f"t{i % 4}" for i in range(150)] + ["t2"] * 3})
    frame.to_csv(tmp_path / "topics.csv", index=False)
    summary = init_project(tmp_path / "topics.csv", text_column="text", label_column="topic", directory=tmp_path)
    config = load_config(summary.config_path)
    assert config.validation.max_text_length is None
    assert config.evaluation.thresholds == {} and config.evaluation.baseline
    assert config.training.max_length == 32  # 95% of these texts fit in a few tokens
    assert any("texts are up to 12002 characters" in line for line in summary.choices)
    assert any(line.startswith("chose training.max_length 32 (95% of the texts fit in") for line in summary.choices)
    assert "texts seen: up to 12002 characters" in summary.config_path.read_text()
    result = validation.run(config, tmp_path / "out" / "report.html", tmp_path / "out" / "result.json")
    assert result.success
    import json

    lengths = json.loads((tmp_path / "out" / "result.json").read_text())["text_lengths"]
    assert lengths["max"] == 12002 and lengths["rows"] == 153


def test_max_length_is_rounded_up_and_capped():
    defaults = derive_defaults(pd.Series(["word " * 300] * 10))
    assert defaults.token_p95 == 302 and defaults.max_length == 320  # [CLS] + 300 + [SEP], up to a multiple of 32
    assert derive_defaults(pd.Series(["word " * 600] * 10)).max_length == 512
    assert derive_defaults(pd.Series(["hi"] * 10)).max_length == 32


def test_a_bound_the_user_sets_still_fails_longer_texts(tmp_path, labelled_frame):
    labelled_frame.loc[3, "text"] = "x" * 400
    labelled_frame[["id", "event_timestamp", "text"]].to_parquet(tmp_path / "texts.parquet", index=False)
    labelled_frame[["id", "event_timestamp", "label"]].to_parquet(tmp_path / "labels.parquet", index=False)
    config = make_config(tmp_path, validation={"max_text_length": 300})
    from tuneloop.errors import DataValidationError

    try:
        validation.run(config, tmp_path / "r.html", tmp_path / "r.json")
    except DataValidationError as error:
        assert any("not 1..300 characters long (lengths [400])" in failure for failure in error.failures)
    else:
        raise AssertionError("a text over the configured bound passed validation")


def test_training_budget_gives_small_data_enough_steps_and_large_data_few_epochs():
    from tuneloop.project import EPOCH_RANGE, TARGET_STEPS, training_epochs

    epochs, steps = training_epochs(5700)  # 3990 training rows at batch 32
    assert steps == 125 and epochs == 7 and epochs * steps >= TARGET_STEPS
    assert training_epochs(500)[0] == EPOCH_RANGE[1]  # tiny data: capped, early stopping ends it
    assert training_epochs(1_000_000)[0] == EPOCH_RANGE[0]


def test_init_writes_the_training_budget_it_chose(tmp_path):
    frame = pd.DataFrame({"text": [f"note {i} about topic {i % 3}" for i in range(600)],
                          "topic": [f"t{i % 3}" for i in range(600)]})
    frame.to_csv(tmp_path / "notes.csv", index=False)
    summary = init_project(tmp_path / "notes.csv", text_column="text", label_column="topic", directory=tmp_path)
    training = load_config(summary.config_path).training
    assert (training.epochs, training.early_stopping_patience, training.learning_rate) == (10, 2, 1e-4)
    assert any(line.startswith("chose training.epochs 10 with early_stopping_patience 2 (14 optimizer steps")
               for line in summary.choices), summary.choices
