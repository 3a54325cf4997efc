"""The `register` component: MLflow model version with lineage, aliases challenger then champion."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def register(
    config_json: str,
    compressed: Input[Model],
    decision: Input[Artifact],
    dataset: Input[Dataset],
    registration: Output[Artifact],
    pipeline_run: str = "",
) -> NamedTuple("RegistrationOutputs", version=str):
    """Register the blessed compressed model in the MLflow registry as the challenger.

    Tags the version with lineage (pipeline run, data fingerprint, test metrics, gate decision,
    and the training frame, stored in the MLflow run's artifact store) and points the alias
    challenger at it; the deploy step moves champion after a successful rollout. Refuses a model
    the gate did not bless. Safe to retry: an attempt first looks for the run and version an
    earlier attempt of the same pipeline run created and completes them, so a retry never makes a
    second version. An unreachable MLflow or object store fails the step with a retryable error.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from tuneloop import registry
    from tuneloop.config import TuneloopConfig
    from tuneloop.evaluation import read_decision

    result = registry.register(
        TuneloopConfig.from_json(config_json),
        compressed.path,
        read_decision(decision.path),
        dataset.path,
        pipeline_run=pipeline_run,
        aliases=(registry.CHALLENGER,),
    )
    Path(registration.path).write_text(json.dumps(result.__dict__, indent=2))
    return namedtuple("RegistrationOutputs", ["version"])(result.version)
