"""The `deploy` component: Bento build, rollout of a model version, smoke test, champion."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components import TUNELOOP_IMAGE


@dsl.component(base_image=TUNELOOP_IMAGE, install_kfp_package=False)
def deploy(
    config_json: str,
    version: str,
    deployment: Output[Artifact],
    pipeline_run: str = "",
) -> NamedTuple("DeployOutputs", status=str, champion=str):
    """Deploy a registered model version and make it champion.

    Builds the Bento from serving/bentofile.yaml, then on the configured target (deployment.target):
    Kubernetes patches the serving Deployment to the version, waits for the rollout, sends the smoke
    requests of deployment.smoke_tests and, on any failure, rolls the Deployment back and leaves the
    champion alias where it was (the step then fails); local loads the version as the server would
    and smoke-tests it. Deploying the version already live does nothing. The result (status,
    previous version, smoke answers) is written as JSON to the deployment artifact either way.
    The outcome is recorded per (pipeline_run, version) in the shared state database: a KFP retry
    after a failed smoke test reports that failure instead of rolling the model out again.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from tuneloop import deployment as stage
    from tuneloop.config import TuneloopConfig

    try:
        result = stage.deploy(TuneloopConfig.from_json(config_json), version, pipeline_run=pipeline_run or None)
    except stage.DeploymentError as error:
        if error.result is not None:
            Path(deployment.path).write_text(json.dumps(error.result.to_dict(), indent=2))
        raise
    Path(deployment.path).write_text(json.dumps(result.to_dict(), indent=2))
    return namedtuple("DeployOutputs", ["status", "champion"])(result.status, result.champion or "")
