"""Hyperparameter search with Optuna: ``tuneloop tune`` and the pipeline's trial workers.

TPE sampling over ``tuning.search_space``, each trial a real fine-tuning run on the Dataset whose
per-epoch validation macro-F1 is reported to the study, so the median pruner stops poor trials
early. The study lives in shared storage (SQLite or a journal file locally, a SQL URL from
``tuning.storage_url_env`` in a cluster), and ``trials`` is the study's total: parallel workers
draw from one study and stop when it has that many finished trials, and a rerun of a finished
search adds none. The best parameters and the study's counts go to the summary and to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError, TrainingError, TuneloopError
from tuneloop.redaction import redact_url

STAGE = "tuning"


@dataclass
class TuningSummary:
    """What a search found: counts, the best value and parameters, where the study lives."""

    study_name: str
    storage: str
    trials: int
    completed: int
    pruned: int
    failed: int
    ran_here: int
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    registry_run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def tune(config: TuneloopConfig, dataset_path: str | Path | None = None, *, trials: int | None = None,
         record: bool = True, log: Callable[[str], None] | None = None) -> TuningSummary:
    """Run this worker's share of the search and summarise the study.

    Args:
        dataset_path: the Dataset artifact; None builds it from the config's data (Feast join).
        trials: the study's total number of trials (default ``tuning.trials``).
        record: log the study to the MLflow experiment (``registry``).

    Raises:
        ConfigError: an unusable search space or storage setting.
        TrainingError: every trial was pruned or failed (no best value to report).
        ServiceUnavailableError: the study storage or registry cannot be reached.
    """
    import optuna

    log = log or (lambda line: print(line, flush=True))
    settings = config.tuning
    total = trials or settings.trials
    if total < 1:
        raise ConfigError(f"--trials must be at least 1, got {total}", stage=STAGE, field="tuning.trials")
    check_search_space(config)
    storage_url, storage = _storage(config)
    study_name = settings.study_name or f"{config.name}-tuning"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets our own line
    study = _call_storage(lambda: optuna.create_study(
        study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=settings.seed), pruner=_pruner(config)), storage_url)
    with tempfile.TemporaryDirectory(prefix="tuneloop-tune-") as scratch:
        dataset = Path(dataset_path) if dataset_path else _build_dataset(config, Path(scratch) / "dataset.parquet")
        finished = _finished(study)
        to_run = max(0, total - finished)
        log(f"tune: study {study_name!r} in {redact_url(storage_url)}: {finished} finished trial(s), "
            f"running {to_run} more (target {total})")
        if to_run:
            study.optimize(
                _objective(config, dataset, Path(scratch), log), n_trials=to_run, catch=(TuneloopError,),
                callbacks=[optuna.study.MaxTrialsCallback(total, states=_finished_states())],
            )
    summary = summarise(study, storage_url, ran_here=to_run)
    if record:
        summary.registry_run_id = record_study(config, summary)
    return summary


def summarise(study, storage_url: str, *, ran_here: int) -> TuningSummary:
    """The study's counts and best trial.

    Raises:
        TrainingError: no trial completed.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {state: sum(1 for t in trials if t.state == state)
             for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if not count[TrialState.COMPLETE]:
        failures = [t.system_attrs.get("fail_reason") or t.user_attrs.get("error") for t in trials
                    if t.state == TrialState.FAIL]
        last = next((reason for reason in reversed(failures) if reason), None)
        raise TrainingError(
            f"study {study.study_name!r}: all {len(trials)} trials were pruned ({count[TrialState.PRUNED]}) or "
            f"failed ({count[TrialState.FAIL]}); no best parameters" + (f" (last failure: {last})" if last else ""),
            stage=STAGE,
        )
    best = study.best_trial
    return TuningSummary(study.study_name, redact_url(storage_url), len(trials), count[TrialState.COMPLETE],
                         count[TrialState.PRUNED], count[TrialState.FAIL], ran_here, float(best.value),
                         dict(best.params), best.number)


def check_search_space(config: TuneloopConfig) -> None:
    """Raises ConfigError for a search space that cannot work with the training settings."""
    space, training = config.tuning.search_space, config.training
    if space.lora_r is not None and training.method != "lora":
        raise ConfigError("tuning.search_space.lora_r searches the LoRA rank, but training.method is "
                          f"{training.method!r}", stage=STAGE, field="tuning.search_space.lora_r")
    patience = training.early_stopping_patience
    low_epochs = space.epochs.low if space.epochs else training.epochs
    if patience is not None and patience >= low_epochs:
        raise ConfigError(f"training.early_stopping_patience {patience} must be below the fewest epochs searched "
                          f"({low_epochs})", stage=STAGE, field="tuning.search_space.epochs")
    if not any(value is not None for value in space.model_dump().values()):
        raise ConfigError("tuning.search_space is empty: give at least one range", stage=STAGE,
                          field="tuning.search_space")


def sample(trial, config: TuneloopConfig) -> dict[str, Any]:
    """Draw one trial's training parameters from the search space (unset ones keep ``training``)."""
    space = config.tuning.search_space
    params: dict[str, Any] = {}
    if space.learning_rate:
        params["learning_rate"] = trial.suggest_float("learning_rate", space.learning_rate.low,
                                                      space.learning_rate.high, log=space.learning_rate.log)
    if space.epochs:
        params["epochs"] = trial.suggest_int("epochs", space.epochs.low, space.epochs.high)
    if space.batch_size:
        params["batch_size"] = trial.suggest_categorical("batch_size", space.batch_size)
    if space.warmup_ratio:
        params["warmup_ratio"] = trial.suggest_float("warmup_ratio", space.warmup_ratio.low, space.warmup_ratio.high,
                                                     log=space.warmup_ratio.log)
    if space.lora_r:
        params["lora_r"] = trial.suggest_categorical("lora_r", space.lora_r)
    return params


def trial_config(config: TuneloopConfig, params: dict[str, Any]) -> TuneloopConfig:
    """The config with a trial's (or the best) parameters applied to ``training``."""
    training = config.training.model_dump()
    for key, value in params.items():
        if key == "lora_r":
            training["lora"]["r"] = value
        else:
            training[key] = value
    if config.tuning.max_train_rows:
        training["max_train_rows"] = config.tuning.max_train_rows
    updated = config.model_dump(mode="json")
    updated["training"] = training
    return TuneloopConfig.model_validate(updated)


def _objective(config: TuneloopConfig, dataset: Path, scratch: Path, log):
    import optuna

    from tuneloop import training

    def objective(trial) -> float:
        params = sample(trial, config)
        log(f"tune: trial {trial.number}: {json.dumps(params, sort_keys=True)}")

        def report(entry: dict) -> None:
            trial.report(entry["validation"]["macro_f1"], entry["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {entry['epoch']} macro-F1 {entry['validation']['macro_f1']:.4f}")

        try:
            summary = training.run(trial_config(config, params), dataset, scratch / f"trial-{trial.number}",
                                   on_epoch=report, log=lambda line: None)
        except optuna.TrialPruned:
            log(f"tune: trial {trial.number} pruned")
            raise
        except TuneloopError as error:
            trial.set_user_attr("error", error.message)
            log(f"tune: trial {trial.number} failed: {error}")
            raise
        log(f"tune: trial {trial.number}: validation macro-F1 {summary.validation_metrics['macro_f1']:.4f} "
            f"(best epoch {summary.best_epoch})")
        return summary.validation_metrics["macro_f1"]

    return objective


def _pruner(config: TuneloopConfig):
    import optuna

    if not config.tuning.pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def _finished_states() -> tuple:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _finished(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in _finished_states())


def _storage(config: TuneloopConfig) -> tuple[str, Any]:
    """The study's storage: a SQL URL (env var or config), a journal file (``*.log``), or SQLite in state_dir."""
    import optuna

    settings = config.tuning
    if settings.storage_url_env:
        url = os.environ.get(settings.storage_url_env)
        if not url:
            raise ConfigError(f"tuning.storage_url_env names {settings.storage_url_env}, which is not set",
                              stage=STAGE, field="tuning.storage_url_env")
        return url, url
    if config.world == "cluster":
        raise ConfigError("tuning.storage_url_env must name a shared SQL database URL in the cluster world "
                          "(a file in one pod is not shared by the trial workers)", stage=STAGE,
                          field="tuning.storage_url_env")
    location = settings.storage or f"sqlite:///{Path(config.state_dir).resolve() / 'tuning.db'}"
    if "://" not in location:
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return str(path), optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if location.startswith("sqlite:///"):
        Path(location.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return location, location


def _call_storage(action, url: str):
    from sqlalchemy.exc import OperationalError

    from tuneloop.errors import ServiceUnavailableError

    try:
        return action()
    except OperationalError as error:
        raise ServiceUnavailableError(f"cannot reach the study storage {redact_url(url)}: {error.orig}",
                                      service="optuna storage", uri=redact_url(url)) from error


def _build_dataset(config: TuneloopConfig, path: Path) -> Path:
    from tuneloop import features

    features.run(config, path)
    return path


def record_study(config: TuneloopConfig, summary: TuningSummary) -> str:
    """Log the study (counts, best value, best parameters) as one MLflow run, found again by study name."""
    from tuneloop import registry

    client = registry.client(config)
    experiment_id = registry._experiment_id(client, config)
    tag = f"tags.`tuneloop.study` = '{summary.study_name}'"
    existing = registry.call(config, "finding the study's run", client.search_runs, [experiment_id], tag, max_results=1)
    if existing:
        run_id = existing[0].info.run_id
    else:
        run = registry.call(config, "creating the study's run", client.create_run, experiment_id,
                            run_name=f"tuning {summary.study_name}",
                            tags={"tuneloop.study": summary.study_name, "tuneloop.kind": "tuning"})
        run_id = run.info.run_id
    from mlflow.entities import Metric, RunTag

    metrics = {"best_validation_macro_f1": summary.best_value, "trials": summary.trials,
               "trials_completed": summary.completed, "trials_pruned": summary.pruned, "trials_failed": summary.failed}
    # Tags, not params: a later worker may find better parameters, and MLflow params are immutable.
    tags = {f"best.{key}": str(value) for key, value in summary.best_params.items()}
    tags.update({"tuneloop.best_params": json.dumps(summary.best_params, sort_keys=True),
                 "tuneloop.best_trial": str(summary.best_trial), "tuneloop.study_storage": summary.storage})
    registry.call(config, "logging the study", client.log_batch, run_id,
                  metrics=[Metric(key, float(value), 0, summary.trials) for key, value in metrics.items()],
                  tags=[RunTag(key, value) for key, value in tags.items()])
    return run_id
