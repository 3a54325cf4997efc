"""The optional search step of the training pipeline: ``tuning.in_pipeline`` compiles a ParallelFor of
trial workers sharing one study, then ``best_parameters``, whose best config the final finetune trains
with. Off by default: the default pipeline has no search."""

from __future__ import annotations

import pytest
import yaml

from tests.pipelines.conftest import cluster_config
from tuneloop.errors import ConfigError
from tuneloop.orchestration import compile_pipeline

SEARCH = {"in_pipeline": True, "parallelism": 3, "trials": 6, "storage_url_env": "TUNELOOP_DATABASE_URL"}


def compiled_spec(tmp_path, config) -> dict:
    output = compile_pipeline("training", tmp_path / "training.yaml", config)
    return next(yaml.safe_load_all(output.read_text(encoding="utf-8")))


def inner_tasks(spec: dict) -> dict:
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def trial_loop(tasks: dict) -> tuple[str, dict]:
    """The one ParallelFor task (its generated name, its spec)."""
    (loop,) = [(name, task) for name, task in tasks.items() if "parameterIterator" in task]
    return loop


def test_the_search_fans_out_and_feeds_the_final_finetune(tmp_path):
    spec = compiled_spec(tmp_path, cluster_config(tuning=SEARCH))
    tasks = inner_tasks(spec)
    loop_name, loop = trial_loop(tasks)
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert "validate-frame" in loop["dependentTasks"]
    workers = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(workers) == {"search-trials"}
    assert workers["search-trials"]["inputs"]["parameters"]["worker"]["componentInputParameter"] == \
        loop["parameterIterator"]["itemInput"]
    assert loop_name in tasks["best-parameters"]["dependentTasks"]
    finetune_config = tasks["finetune"]["inputs"]["parameters"]["config_json"]
    assert finetune_config["taskOutputParameter"] == {"outputParameterKey": "best_config_json",
                                                      "producerTask": "best-parameters"}
    # the steps after training still read the project's own config
    assert tasks["compress"]["inputs"]["parameters"]["config_json"] == {
        "componentInputParameter": "pipelinechannel--config_json"}


def test_a_trial_worker_is_retried_and_gets_the_study_storage_secret(tmp_path):
    spec = compiled_spec(tmp_path, cluster_config(tuning=SEARCH))
    _, loop = trial_loop(inner_tasks(spec))
    worker = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["search-trials"]
    assert worker["retryPolicy"]["maxRetryCount"] >= 1
    assert "retryPolicy" not in inner_tasks(spec)["best-parameters"]
    # the Kubernetes platform spec (Secrets as env) is the second YAML document
    platform = list(yaml.safe_load_all((tmp_path / "training.yaml").read_text(encoding="utf-8")))[1]
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-search-trials"]["secretAsEnv"]
    assert any(entry["keyToEnv"][0]["envVar"] == "TUNELOOP_DATABASE_URL" for entry in secrets)


def test_the_default_pipeline_has_no_search(tmp_path):
    spec = compiled_spec(tmp_path, cluster_config())
    tasks = inner_tasks(spec)
    assert not any("parameterIterator" in task for task in tasks.values())
    assert {"search-trials", "best-parameters"}.isdisjoint(tasks)
    assert not any(name.startswith(("comp-search-trials", "comp-best-parameters")) for name in spec["components"])
    assert tasks["finetune"]["inputs"]["parameters"]["config_json"] == {
        "componentInputParameter": "pipelinechannel--config_json"}


def test_search_storage_must_come_from_a_secret(tmp_path):
    config = cluster_config(tuning={**SEARCH, "storage_url_env": "TUNELOOP_STUDY_URL"})
    with pytest.raises(ConfigError) as refused:
        compile_pipeline("training", tmp_path / "training.yaml", config)
    assert "tuning.storage_url_env: 'TUNELOOP_STUDY_URL' is filled by no kubeflow.secrets entry" in str(refused.value)
    assert not (tmp_path / "training.yaml").exists()
