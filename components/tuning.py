"""The search components: trial workers under a ``ParallelFor`` share one Optuna study, then
``best_parameters`` summarises it, records it in the registry and hands the best config on."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def search_trials(config_json: str, dataset: Input[Dataset], worker: int = 0) -> int:
    """One trial worker: run trials of the shared study (``tuning.storage_url_env``) until it holds
    ``tuning.trials`` finished ones; returns how many this worker ran. Safe to retry: the study
    counts finished trials, so a retried worker only adds the missing ones."""
    from tuneloop import tuning
    from tuneloop.config import TuneloopConfig

    print(f"search worker {worker}", flush=True)
    return tuning.tune(TuneloopConfig.from_json(config_json), dataset.path, record=False).ran_here


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def best_parameters(
    config_json: str, dataset: Input[Dataset], metrics: Output[Metrics]
) -> NamedTuple("SearchOutputs", best_config_json=str, best_params=str):
    """Summarise the study (trials, best value, best parameters), record it in the registry, and
    return the config with the best parameters applied, for the final ``finetune``. Fails with one
    line when every trial was pruned or failed."""
    import json
    from collections import namedtuple

    from tuneloop import tuning
    from tuneloop.config import TuneloopConfig

    config = TuneloopConfig.from_json(config_json)
    summary = tuning.tune(config, dataset.path)
    for name in ("trials", "completed", "pruned", "failed", "best_value"):
        metrics.log_metric(f"search_{name}", float(getattr(summary, name)))
    outputs = namedtuple("SearchOutputs", ["best_config_json", "best_params"])
    return outputs(tuning.trial_config(config, summary.best_params).to_json(), json.dumps(summary.best_params))
