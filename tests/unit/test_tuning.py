"""Hyperparameter search: Optuna TPE over real tiny fine-tuning runs, pruning, shared storage."""


import json

import optuna
import pytest

from tests.conftest import make_config
from tuneloop import training, tuning
from tuneloop.errors import ConfigError, TrainingError


def search_config(tmp_path, checkpoint, **tuning_settings):
    settings = {"trials": 2, "storage": str(tmp_path / "study.log"),
                "search_space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                 "epochs": {"low": 1, "high": 2}, "batch_size": [8, 16]},
                **tuning_settings}
    return make_config(tmp_path, training={"base_model": str(checkpoint), "max_length": 32, "batch_size": 16},
                       tuning=settings)


def test_search_finds_best_parameters_records_them_and_resumes(tmp_path, tiny_checkpoint, tiny_dataset):
    config = search_config(tmp_path, tiny_checkpoint)
    lines: list[str] = []
    first = tuning.tune(config, tiny_dataset, trials=2, log=lines.append)
    assert first.trials == 2 and first.ran_here == 2
    assert first.completed + first.pruned + first.failed == 2 and first.completed >= 1
    assert set(first.best_params) == {"learning_rate", "epochs", "batch_size"}
    assert 1e-4 <= first.best_params["learning_rate"] <= 1e-2 and first.best_params["batch_size"] in (8, 16)
    study = optuna.load_study(study_name="test-tuning",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))
    assert study.best_value == first.best_value
    assert study.best_trial.intermediate_values, "per-epoch macro-F1 was reported"
    # A second worker (or a rerun) with a larger target adds only the missing trial.
    second = tuning.tune(config, tiny_dataset, trials=3, log=lines.append)
    assert second.trials == 3 and second.ran_here == 1
    assert tuning.tune(config, tiny_dataset, trials=3, log=lines.append).ran_here == 0
    # The registry holds the study: one run, found again by name, with the best parameters.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(second.registry_run_id)
    assert first.registry_run_id == second.registry_run_id
    assert run.data.metrics["trials"] == 3 and run.data.metrics["best_validation_macro_f1"] == second.best_value
    assert json.loads(run.data.tags["tuneloop.best_params"]) == second.best_params


def test_poor_trials_are_pruned_from_per_epoch_reports(tmp_path, tiny_checkpoint, tiny_dataset, monkeypatch):
    class PruneAfterFirstEpoch(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.number > 0 and 1 in trial.intermediate_values

    monkeypatch.setattr(tuning, "_pruner", lambda config: PruneAfterFirstEpoch())
    config = search_config(tmp_path, tiny_checkpoint,
                           search_space={"learning_rate": {"low": 1e-4, "high": 1e-3}, "epochs": {"low": 2, "high": 3}})
    summary = tuning.tune(config, tiny_dataset, trials=2, record=False, log=lambda line: None)
    assert (summary.completed, summary.pruned) == (1, 1) and summary.best_trial == 0


def test_every_trial_failed_is_one_clear_error(tmp_path, tiny_checkpoint, tiny_dataset, monkeypatch):
    def broken(*args, **kwargs):
        raise TrainingError("loss became nan at epoch 1 step 3; lower training.learning_rate", stage="training")

    monkeypatch.setattr(training, "run", broken)
    with pytest.raises(TrainingError, match=r"all 2 trials were pruned \(0\) or failed \(2\); no best parameters "
                                            r"\(last failure: loss became nan"):
        tuning.tune(search_config(tmp_path, tiny_checkpoint), tiny_dataset, trials=2, record=False,
                    log=lambda line: None)


def test_bad_search_spaces_are_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"tuning.search_space.learning_rate.*empty or inverted range: low 0.01 "
                                          r"must be below high 0.001"):
        search_config(tmp_path, tiny_checkpoint, search_space={"learning_rate": {"low": 1e-2, "high": 1e-3}})
    with pytest.raises(ConfigError, match=r"tuning.search_space.epochs.*low 3 must be below high 3"):
        search_config(tmp_path, tiny_checkpoint, search_space={"epochs": {"low": 3, "high": 3}})
    with pytest.raises(ConfigError, match="tuning.search_space.batch_size.*non-empty list"):
        search_config(tmp_path, tiny_checkpoint, search_space={"batch_size": []})
    lora = search_config(tmp_path, tiny_checkpoint, search_space={"lora_r": [4, 8]})
    with pytest.raises(ConfigError, match="lora_r searches the LoRA rank, but training.method is 'full'"):
        tuning.tune(lora, "unused", record=False)
    cluster_storage = search_config(tmp_path, tiny_checkpoint, storage_url_env="TUNELOOP_TEST_NO_SUCH_URL")
    with pytest.raises(ConfigError, match="TUNELOOP_TEST_NO_SUCH_URL, which is not set"):
        tuning.tune(cluster_storage, "unused", record=False)


def test_cli_tune_prints_the_best_parameters(tmp_path, tiny_checkpoint, tiny_dataset, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from tuneloop.cli import cli

    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(yaml.safe_dump({
        "name": "clitest", "state_dir": str(tmp_path / "state"),
        "data": {"texts": "t.parquet", "labels": "l.parquet", "classes": ["ham", "spam"]},
        "training": {"base_model": str(tiny_checkpoint), "max_length": 32, "epochs": 1},
        "tuning": {"trials": 1, "search_space": {"learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}}},
    }))
    result = CliRunner().invoke(cli, ["tune", "--config", str(config_file), "--dataset", str(tiny_dataset)])
    assert result.exit_code == 0, result.output
    assert "study 'clitest-tuning'" in result.output and "1 trials, 1 completed" in result.output
    assert "best validation macro-F1" in result.output and '"learning_rate"' in result.output
    assert "recorded in the registry as run" in result.output


def test_search_components_compile_under_parallel_for(tmp_path):
    """Trial workers fan out with ParallelFor; the best config feeds the final finetune."""
    from kfp import compiler, dsl

    from components.training import finetune
    from components.tuning import best_parameters, search_trials

    @dsl.pipeline(name="search-then-train")
    def search_then_train(config_json: str, dataset_uri: str = "s3://b/dataset.parquet"):
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        with dsl.ParallelFor(items=[0, 1, 2], parallelism=3, name="trial-workers") as worker:
            workers = search_trials(config_json=config_json, dataset=dataset.output, worker=worker)
        best = best_parameters(config_json=config_json, dataset=dataset.output).after(workers)
        finetune(config_json=best.outputs["best_config_json"], dataset=dataset.output,
                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER)

    output = tmp_path / "search.yaml"
    compiler.Compiler().compile(search_then_train, str(output))
    import yaml

    spec = yaml.safe_load(output.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    (loop,) = [task for task in tasks.values() if "parameterIterator" in task]
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]" and loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert tasks["finetune"]["inputs"]["parameters"]["config_json"]["taskOutputParameter"] == {
        "outputParameterKey": "best_config_json", "producerTask": "best-parameters"}
