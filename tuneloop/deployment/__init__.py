"""Deployment: build the Bento, roll a model version out, smoke-test it, promote it, roll it back.

Two targets (``deployment.target``):

- ``local``: the model is served on this machine by ``tuneloop serve`` (``bentoml serve serving/``,
  see :func:`serve`), which loads the ``champion`` at start-up. :func:`deploy` builds the Bento,
  loads the version in-process exactly as the server would and runs the smoke tests on it, then moves
  ``champion``; a running server picks the new champion up when it is restarted.
- ``kubernetes``: :func:`deploy` patches the serving Deployment (``deployment.deployment_name`` in
  ``deployment.namespace``) to the version: the ``tuneloop.dev/model-version`` annotation of the
  Deployment, the label and annotation of its pod template (the pods read the label through the
  downward API as ``TUNELOOP_MODEL_VERSION``) and, where the container sets that variable to a
  literal value, the variable itself. It waits for the rollout (observedGeneration, updated and
  available replicas, no old replicas left, within ``deployment.rollout_timeout_s``), sends the
  smoke requests of ``deployment.smoke_tests`` to ``deployment.service_url`` and checks that the new
  version answers them with the expected labels. Any failure re-patches the Deployment to the version
  it ran before and leaves ``champion`` where it was. Success moves ``champion``.

Deploying the version that is already live (and champion) does nothing. Every champion move is
recorded: the alias ``previous-champion`` names the version it replaced, and the champion history
lives in the shared state database (:mod:`tuneloop.champions`: compare-and-set under the champion
lock, so concurrent deploys and promotions lose no entry; read errors propagate). :func:`rollback` makes the
newest earlier entry champion again (re-rolling the cluster on the Kubernetes target) and drops the
rolled-back entries, so repeated rollbacks walk further back instead of toggling between two versions.

Given ``pipeline_run``, :func:`deploy` records its outcome per (pipeline run, model version) in the
state database and looks for it before acting: a KFP retry after a failed smoke test reports that
failure instead of rolling the same model out again, and a retry after success does nothing.

The stage in modules: :mod:`~tuneloop.deployment.rollout` (deploy, promote, rollback),
:mod:`~tuneloop.deployment.cluster` (the Kubernetes Deployment), :mod:`~tuneloop.deployment.smoke`
(smoke tests), :mod:`~tuneloop.deployment.outcomes` (outcomes per pipeline run),
:mod:`~tuneloop.deployment.bento` (the Bento), :mod:`~tuneloop.deployment.server` (``tuneloop serve``)
and :mod:`~tuneloop.deployment.common` (constants, error and result types).
"""

from tuneloop.champions import HISTORY_LIMIT, HISTORY_TAG, PREVIOUS_CHAMPION
from tuneloop.deployment.bento import build_bento, serving_dir
from tuneloop.deployment.cluster import kubernetes_apps_api, rollout_state
from tuneloop.deployment.common import (
    ANNOTATION,
    DEFAULT_SMOKE_TEXT,
    DEPLOYED,
    FAILED,
    SERVING_DIR_ENV,
    STAGE,
    UNCHANGED,
    DeployResult,
    DeploymentError,
    SmokeCheck,
    logger,
)
from tuneloop.deployment.outcomes import deploy_outcome
from tuneloop.deployment.rollout import deploy, promote, rollback
from tuneloop.deployment.server import run_server, serve
from tuneloop.deployment.smoke import local_smoke_test, service_url, smoke_cases, smoke_test

__all__ = [
    "ANNOTATION",
    "DEFAULT_SMOKE_TEXT",
    "DEPLOYED",
    "FAILED",
    "HISTORY_LIMIT",
    "HISTORY_TAG",
    "PREVIOUS_CHAMPION",
    "SERVING_DIR_ENV",
    "STAGE",
    "UNCHANGED",
    "DeployResult",
    "DeploymentError",
    "SmokeCheck",
    "build_bento",
    "deploy",
    "deploy_outcome",
    "kubernetes_apps_api",
    "local_smoke_test",
    "logger",
    "promote",
    "rollback",
    "rollout_state",
    "run_server",
    "serve",
    "service_url",
    "serving_dir",
    "smoke_cases",
    "smoke_test",
]
