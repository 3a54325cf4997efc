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
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuneloop import champions
from tuneloop.champions import HISTORY_LIMIT, HISTORY_TAG, PREVIOUS_CHAMPION  # noqa: F401 (re-exported)
from tuneloop.config import TuneloopConfig, load_config
from tuneloop.errors import TuneloopError

logger = logging.getLogger("tuneloop.deployment")

STAGE = "deployment"
ANNOTATION = "tuneloop.dev/model-version"
DEFAULT_SMOKE_TEXT = "tuneloop smoke test"
SERVING_DIR_ENV = "TUNELOOP_SERVING_DIR"

DEPLOYED, UNCHANGED, FAILED = "deployed", "unchanged", "failed"


class DeploymentError(TuneloopError):
    """A rollout, smoke test or promotion failed; ``result`` says what was done and undone."""

    exit_code = 8

    def __init__(self, message: str, *, result: "DeployResult | None" = None, **context: Any) -> None:
        context.setdefault("stage", STAGE)
        super().__init__(message, **context)
        self.result = result


@dataclass
class SmokeCheck:
    """One smoke request: the text, the label expected (None: any) and what the server answered."""

    text: str
    expected_label: str | None
    label: str | None = None
    model_version: str | None = None
    passed: bool = False
    error: str | None = None


@dataclass
class DeployResult:
    """What a deploy, promote or rollback did.

    ``status`` is ``deployed`` (the version is live and champion), ``unchanged`` (it already was) or
    ``failed`` (then ``rolled_back`` says whether the cluster was returned to ``previous_version``).
    """

    version: str
    target: str
    status: str
    previous_version: str | None = None
    champion: str | None = None
    previous_champion: str | None = None
    bento: str | None = None
    rolled_back: bool = False
    smoke: list[SmokeCheck] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Public API


def deploy(
    config: TuneloopConfig,
    version: str,
    *,
    pipeline_run: str | None = None,
    apps_api: Any = None,
    http: Callable[..., tuple[int, Any]] | None = None,
    build: Callable[[TuneloopConfig, str], str | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> DeployResult:
    """Roll ``version`` out on the configured target, smoke-test it and make it champion.

    Args:
        config: the project config (``deployment`` and ``registry`` sections).
        version: the registry version to deploy.
        pipeline_run: the pipeline run deploying it. Its outcome is recorded, and a repeat of the same
            run (a KFP retry) returns or raises that recorded outcome instead of rolling out again.
        apps_api: a ``kubernetes.client.AppsV1Api`` (default: in-cluster config, else kubeconfig).
        http: ``post(url, json=..., headers=..., timeout=...) -> (status, body)`` for smoke requests.
        build: builds the Bento and returns its tag (default :func:`build_bento`; skipped when
            ``deployment.build_bento`` is false).
        sleep, clock: injected for tests.

    Returns:
        the :class:`DeployResult` (``deployed`` or ``unchanged``).

    Raises:
        DeploymentError: the rollout or a smoke test failed (the cluster was rolled back, champion
            unchanged), or the Bento could not be built, or this pipeline run already failed to
            deploy this version.
        RegistryError: the version does not exist.
        ServiceUnavailableError: the state database is unreachable.
    """
    version = str(version)
    if pipeline_run:
        earlier = deploy_outcome(config, pipeline_run, version)
        if earlier is not None:
            return _repeated(earlier, pipeline_run)
    try:
        result = _deploy(config, version, apps_api=apps_api, http=http, build=build, sleep=sleep, clock=clock)
    except DeploymentError as error:
        if pipeline_run and error.result is not None:  # rolled out or smoke-tested, and failed: a verdict
            _record_outcome(config, pipeline_run, error.result)
        raise
    if pipeline_run:
        _record_outcome(config, pipeline_run, result)
    return result


def promote(config: TuneloopConfig, version: str, **options: Any) -> DeployResult:
    """Make ``version`` champion. On the Kubernetes target this is a full :func:`deploy` (roll out,
    smoke test, roll back on failure); locally it moves the alias (restart ``tuneloop serve``).

    Raises:
        RegistryError: the version does not exist.
        DeploymentError: (Kubernetes) the rollout or smoke test failed.
    """
    from tuneloop import registry, serving

    version = str(version)
    if config.deployment.target == "kubernetes":
        return deploy(config, version, **options)
    serving.model_version_source(config, version)
    champion = registry.alias_version(config, registry.CHAMPION)
    if champion == version:
        champions.seed_history(config, version)
        return DeployResult(version, "local", UNCHANGED, champion=version,
                            message=f"version {version} is already champion")
    previous = champions.move_champion(config, version)
    return DeployResult(version, "local", DEPLOYED, previous_version=previous, champion=version,
                        previous_champion=previous,
                        message=f"champion {previous or '-'} -> {version}; restart `tuneloop serve` to serve it")


def rollback(config: TuneloopConfig, **options: Any) -> DeployResult:
    """Make the previous champion champion again (and, on Kubernetes, roll the cluster back to it).

    Raises:
        DeploymentError: no earlier champion is recorded, or (Kubernetes) its rollout failed.
    """
    from tuneloop import registry

    champion = registry.alias_version(config, registry.CHAMPION)
    history = champions.history(config)
    target, truncated = champions.rollback_target(config, champion, history)
    if target is None:
        raise DeploymentError(
            f"nothing to roll back to: no earlier champion of {config.registry.model_name!r} is recorded "
            f"(champion {champion or '-'}, history {history or '[]'}); promote a version explicitly",
            field="champion",
        )
    if config.deployment.target == "kubernetes":
        result = _deploy(config, target, rollback=True, **options)
    else:
        previous = champions.move_champion(config, target, rollback=True)
        result = DeployResult(target, "local", DEPLOYED, previous_version=previous, champion=target,
                              previous_champion=champions.previous_in(truncated, target))
    result.message = f"rolled back champion {champion or '-'} -> {target}. " + result.message
    return result


def serve(
    config_path: str | os.PathLike[str],
    *,
    port: int | None = None,
    version: str | None = None,
    host: str = "127.0.0.1",
    check: bool = True,
    extra_args: list[str] | None = None,
) -> int:
    """Serve the champion (or ``version``) on this machine with ``bentoml serve serving/``; blocks.

    With ``check`` the model is resolved, downloaded and loaded here first, so a missing champion,
    an unknown version or a corrupt artifact fails with one clear error before any server starts;
    the server is then pinned to the version that was checked (restart to pick up a new champion).

    Returns:
        the exit status of the server process.

    Raises:
        ConfigError, RegistryError, ModelError: the configuration or the model is unusable.
    """
    from tuneloop import serving

    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    env = dict(os.environ)
    env[serving.CONFIG_ENV] = str(config_path)
    env[serving.WORKDIR_ENV] = os.getcwd()  # the server's workers run inside serving/
    requested = version or env.get(serving.VERSION_ENV) or config.deployment.model_version
    model_dir = env.get(serving.MODEL_DIR_ENV)
    if check:
        if model_dir:
            serving.load_model(model_dir, requested or "local")
        else:
            requested, directory = serving.fetch_model(config, requested)
            serving.load_model(directory, requested)
    if requested:
        env[serving.VERSION_ENV] = str(requested)
    command = [*_bentoml_command(), "serve", str(serving_dir()), "--host", host,
               "--port", str(port or config.deployment.port), *(extra_args or [])]
    print(f"serving {config.registry.model_name} version {requested or 'champion'}: {' '.join(command)}", flush=True)
    return run_server(command, env)


def run_server(command: list[str], env: dict[str, str], *, grace_s: float = 60.0) -> int:
    """Run the server in the foreground and return its exit status. Ctrl+C reaches the server from the
    terminal and SIGTERM is forwarded to it; either way the server gets ``grace_s`` seconds to shut
    down cleanly (flushing the prediction log) before it is killed."""
    import signal

    process = subprocess.Popen(command, env=env)

    def forward(signum, _frame):
        if process.poll() is None:
            process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:
            try:
                process.wait(timeout=grace_s)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_bento(config: TuneloopConfig, version: str | None = None, *, store_dir: str | Path | None = None) -> str:
    """Build the Bento from ``serving/bentofile.yaml`` (offline: nothing is resolved or locked) into
    BentoML's store (``$BENTOML_HOME``, or ``store_dir``) and return its tag. The Bento holds the
    service code; the model is fetched from the registry when the server starts.

    Raises:
        DeploymentError: the service cannot be imported or the build fails.
    """
    import bentoml

    directory = serving_dir()
    options: dict[str, Any] = {}
    if store_dir is not None:
        from bentoml._internal.bento import BentoStore

        Path(store_dir).mkdir(parents=True, exist_ok=True)
        options["_bento_store"] = BentoStore(str(store_dir))
    labels = {"model-name": _label_value(config.registry.model_name)}
    if version:
        labels["model-version"] = str(version)
    try:
        bento = bentoml.bentos.build_bentofile(str(directory / "bentofile.yaml"), build_ctx=str(directory),
                                               labels=labels, **options)
    except Exception as error:  # BentoML raises many types (import errors of the service included)
        raise DeploymentError(f"building the Bento from {directory / 'bentofile.yaml'} failed: {error}",
                              path=str(directory)) from error
    return str(bento.tag)


def serving_dir() -> Path:
    """The ``serving/`` folder (``service.py`` + ``bentofile.yaml``): ``$TUNELOOP_SERVING_DIR`` when set,
    else the ``serving`` package installed with tuneloop (found with ``importlib.resources``).

    Raises:
        DeploymentError: the folder does not hold the service.
    """
    import importlib.resources

    configured = os.environ.get(SERVING_DIR_ENV)
    if configured:
        candidate = Path(configured)
    else:
        try:
            candidate = Path(str(importlib.resources.files("serving")))
        except ModuleNotFoundError:
            raise DeploymentError("the serving package is not installed; reinstall tuneloop (its wheel ships "
                                  f"serving/) or set {SERVING_DIR_ENV}", field=SERVING_DIR_ENV) from None
    if (candidate / "service.py").is_file() and (candidate / "bentofile.yaml").is_file():
        return candidate.resolve()
    raise DeploymentError(f"{candidate} holds no service.py + bentofile.yaml (the serving/ folder)",
                          path=str(candidate), field=SERVING_DIR_ENV)


# --------------------------------------------------------------------------------------------
# Deploy


def _deploy(config, version, *, apps_api=None, http=None, build=None, sleep=time.sleep, clock=time.monotonic,
            rollback: bool = False) -> DeployResult:
    from tuneloop import registry, serving

    serving.model_version_source(config, version)  # RegistryError for an unknown version
    target = config.deployment.target
    champion = registry.alias_version(config, registry.CHAMPION)
    result = DeployResult(version=version, target=target, status=FAILED, champion=champion)
    if target == "kubernetes":
        api = apps_api if apps_api is not None else kubernetes_apps_api()
        live = _live_version(_read_deployment(api, config))
        result.previous_version = live
        if live == version and champion == version:
            champions.seed_history(config, version)
            result.status = UNCHANGED
            result.message = f"version {version} is already live in {_where(config)} and champion"
            return result
        result.bento = _build(config, version, build)
        if live != version:
            _rollout(api, config, version, live, result, http=http, sleep=sleep, clock=clock)
        else:  # live but never promoted (an earlier deploy stopped before moving the alias)
            _smoke_live(config, version, result, http=http, sleep=sleep, clock=clock)
    else:
        result.previous_version = champion
        if champion == version:
            champions.seed_history(config, version)
            result.status = UNCHANGED
            result.message = f"version {version} is already champion"
            return result
        result.bento = _build(config, version, build)
        result.smoke = local_smoke_test(config, version)
        failed = [check for check in result.smoke if not check.passed]
        if failed:
            result.message = f"smoke test failed on version {version}: {_describe_failures(failed)}; champion stays " \
                             f"{champion or '-'}"
            raise DeploymentError(result.message, result=result)
    result.previous_champion = champions.move_champion(config, version, rollback=rollback)
    result.champion = version
    result.status = DEPLOYED
    result.message = (result.message + " " if result.message else "") + f"version {version} deployed to " \
        f"{_where(config)}; champion {result.previous_champion or '-'} -> {version}"
    logger.info(result.message)
    return result


def _build(config, version, build) -> str | None:
    if not config.deployment.build_bento:
        return None
    return (build or build_bento)(config, version)


def _where(config) -> str:
    if config.deployment.target == "kubernetes":
        return f"Deployment {config.deployment.namespace}/{config.deployment.deployment_name}"
    return "the local server (restart `tuneloop serve`)"


def _rollout(api, config, version, previous, result, *, http, sleep, clock) -> None:
    """Patch to ``version``, wait, smoke-test; on any failure patch back to ``previous`` and raise."""
    try:
        _patch_version(api, config, version)
        _wait_for_rollout(api, config, sleep=sleep, clock=clock)
        result.smoke = smoke_test(config, version, http=http, sleep=sleep, clock=clock)
        failed = [check for check in result.smoke if not check.passed]
        if failed:
            raise DeploymentError(f"smoke test failed on version {version}: {_describe_failures(failed)}")
    except Exception as error:
        reason = error.message if isinstance(error, TuneloopError) else f"{type(error).__name__}: {error}"
        result.rolled_back = _roll_back(api, config, previous, sleep=sleep, clock=clock)
        state = (f"rolled {_where(config)} back to version {previous}" if result.rolled_back
                 else f"could NOT roll {_where(config)} back to version {previous or '-'}")
        result.message = (f"deploying version {version} failed: {reason}; {state}; "
                          f"champion stays {result.champion or '-'}")
        raise DeploymentError(result.message, result=result) from error


def _smoke_live(config, version, result, *, http, sleep, clock) -> None:
    result.smoke = smoke_test(config, version, http=http, sleep=sleep, clock=clock)
    failed = [check for check in result.smoke if not check.passed]
    if failed:
        result.message = (f"smoke test failed on live version {version}: {_describe_failures(failed)}; "
                          f"champion stays {result.champion or '-'}")
        raise DeploymentError(result.message, result=result)


def _roll_back(api, config, previous, *, sleep, clock) -> bool:
    if not previous:
        logger.error("no previous model version recorded on %s; nothing to roll back to", _where(config))
        return False
    try:
        _patch_version(api, config, previous)
        _wait_for_rollout(api, config, sleep=sleep, clock=clock)
        return True
    except Exception:
        logger.exception("rolling %s back to version %s failed", _where(config), previous)
        return False


def _describe_failures(failed: list[SmokeCheck]) -> str:
    parts = []
    for check in failed:
        if check.error:
            parts.append(f"{check.text!r}: {check.error}")
        else:
            parts.append(f"{check.text!r}: expected {check.expected_label!r}, got {check.label!r}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Kubernetes


def kubernetes_apps_api():
    """An ``AppsV1Api``: in-cluster service account first, else the local kubeconfig.

    Raises:
        DeploymentError: neither is available.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as error:  # missing or invalid kubeconfig
            raise DeploymentError(f"cannot reach Kubernetes: no in-cluster service account and no usable "
                                  f"kubeconfig ({error})") from error
    return client.AppsV1Api()


def _read_deployment(api, config):
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    try:
        return api.read_namespaced_deployment(name=name, namespace=namespace)
    except Exception as error:
        status = getattr(error, "status", None)
        if status == 404:
            raise DeploymentError(f"Deployment {namespace}/{name} does not exist; apply k8s/ first "
                                  f"(kubectl apply -k k8s/overlays/...)", field="deployment.deployment_name") from error
        raise DeploymentError(f"cannot read Deployment {namespace}/{name}: {_api_error(error)}") from error


def _container(deployment, config):
    containers = list(deployment.spec.template.spec.containers or [])
    if config.deployment.container:
        for container in containers:
            if container.name == config.deployment.container:
                return container
        raise DeploymentError(f"Deployment {config.deployment.deployment_name} has no container "
                              f"{config.deployment.container!r} (has {[c.name for c in containers]})",
                              field="deployment.container")
    from tuneloop.serving import VERSION_ENV

    for container in containers:
        if any(variable.name == VERSION_ENV for variable in container.env or []):
            return container
    return containers[0] if containers else None


def _live_version(deployment) -> str | None:
    """The model version a Deployment runs: its annotation, else the pod label, else a literal env value."""
    from tuneloop.serving import VERSION_ENV

    annotations = deployment.metadata.annotations or {}
    if annotations.get(ANNOTATION):
        return str(annotations[ANNOTATION])
    template_metadata = deployment.spec.template.metadata
    labels = (template_metadata.labels if template_metadata is not None else None) or {}
    if labels.get(ANNOTATION):
        return str(labels[ANNOTATION])
    for container in deployment.spec.template.spec.containers or []:
        for variable in container.env or []:
            if variable.name == VERSION_ENV and variable.value:
                return str(variable.value)
    return None


def _patch_version(api, config, version: str) -> None:
    from tuneloop.serving import VERSION_ENV

    deployment = _read_deployment(api, config)
    body: dict[str, Any] = {
        "metadata": {"annotations": {ANNOTATION: version}},
        "spec": {"template": {"metadata": {"labels": {ANNOTATION: version}, "annotations": {ANNOTATION: version}}}},
    }
    container = _container(deployment, config)
    if container is not None and any(v.name == VERSION_ENV and v.value_from is None for v in container.env or []):
        body["spec"]["template"]["spec"] = {
            "containers": [{"name": container.name, "env": [{"name": VERSION_ENV, "value": version}]}]
        }
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    try:
        api.patch_namespaced_deployment(name=name, namespace=namespace, body=body)
    except Exception as error:
        raise DeploymentError(f"cannot patch Deployment {namespace}/{name} to version {version}: "
                              f"{_api_error(error)}") from error
    logger.info("patched Deployment %s/%s to model version %s", namespace, name, version)


def rollout_state(deployment) -> tuple[bool, str]:
    """Whether a Deployment's rollout is complete (as ``kubectl rollout status`` decides), and why not."""
    status = deployment.status
    generation = deployment.metadata.generation or 0
    if status is None or (status.observed_generation or 0) < generation:
        return False, "waiting for the controller to observe the new generation"
    for condition in status.conditions or []:
        if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
            raise DeploymentError(f"rollout exceeded its progress deadline: {condition.message}")
    wanted = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    updated = status.updated_replicas or 0
    if updated < wanted:
        return False, f"{updated} of {wanted} replicas updated"
    if (status.replicas or 0) > updated:
        return False, f"{(status.replicas or 0) - updated} old replicas pending termination"
    if (status.available_replicas or 0) < updated:
        return False, f"{status.available_replicas or 0} of {updated} updated replicas available"
    return True, "complete"


def _wait_for_rollout(api, config, *, sleep, clock) -> None:
    name, namespace = config.deployment.deployment_name, config.deployment.namespace
    deadline = clock() + config.deployment.rollout_timeout_s
    reason = "not started"
    while True:
        try:
            deployment = api.read_namespaced_deployment_status(name=name, namespace=namespace)
        except Exception as error:
            raise DeploymentError(f"cannot read the rollout status of {namespace}/{name}: "
                                  f"{_api_error(error)}") from error
        done, reason = rollout_state(deployment)
        if done:
            return
        if clock() >= deadline:
            raise DeploymentError(f"rollout of {namespace}/{name} did not finish within "
                                  f"{config.deployment.rollout_timeout_s:g}s ({reason})",
                                  field="deployment.rollout_timeout_s")
        sleep(config.deployment.poll_interval_s)


def _api_error(error: Exception) -> str:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------
# Smoke tests


def smoke_cases(config: TuneloopConfig) -> list[SmokeCheck]:
    """The smoke inputs: ``deployment.smoke_tests``, or one text with no expected label."""
    cases = [SmokeCheck(case.text, case.expected_label) for case in config.deployment.smoke_tests]
    return cases or [SmokeCheck(DEFAULT_SMOKE_TEXT, None)]


def service_url(config: TuneloopConfig) -> str:
    """Where smoke requests go: ``deployment.service_url``, or the in-cluster Service of the Deployment."""
    if config.deployment.service_url:
        return config.deployment.service_url.rstrip("/")
    if config.deployment.target == "kubernetes":
        return f"http://{config.deployment.deployment_name}.{config.deployment.namespace}.svc.cluster.local"
    return f"http://127.0.0.1:{config.deployment.port}"


def smoke_test(
    config: TuneloopConfig,
    version: str,
    *,
    http: Callable[..., tuple[int, Any]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[SmokeCheck]:
    """POST the smoke texts to ``<service_url>/predict`` until ``version`` answers (old pods may still
    drain for a moment) or ``deployment.smoke_timeout_s`` passes; check each expected label."""
    from tuneloop.serving import API_KEY_HEADER

    http = http or _httpx_post
    cases = smoke_cases(config)
    url = f"{service_url(config)}/predict"
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get(config.deployment.api_key_env)
    if api_key:
        headers[API_KEY_HEADER] = api_key
    deadline = clock() + config.deployment.smoke_timeout_s
    while True:
        error = None
        try:
            status, body = http(url, json={"texts": [case.text for case in cases]}, headers=headers,
                                timeout=config.deployment.smoke_timeout_s)
        except Exception as exc:  # connection refused, timeouts: retried until the deadline
            status, body, error = None, None, f"{type(exc).__name__}: {exc}"
        if status == 200 and isinstance(body, list) and len(body) == len(cases):
            versions = {str(item.get("model_version")) for item in body if isinstance(item, dict)}
            if versions == {str(version)}:
                return [_check(case, item) for case, item in zip(cases, body)]
            error = f"answered by model version(s) {sorted(versions)}, not {version}"
        elif error is None:
            error = f"HTTP {status}: {str(body)[:300]}"
        if clock() >= deadline:
            return [SmokeCheck(case.text, case.expected_label, error=error) for case in cases]
        sleep(min(config.deployment.poll_interval_s, 1.0))


def _check(case: SmokeCheck, item: dict) -> SmokeCheck:
    label, version = item.get("label"), item.get("model_version")
    probabilities = item.get("probabilities") or {}
    total = sum(probabilities.values()) if probabilities else 0.0
    error = None
    if abs(total - 1.0) > 1e-3:
        error = f"probabilities sum to {total:.4f}, not 1"
    passed = error is None and (case.expected_label is None or label == case.expected_label)
    return SmokeCheck(case.text, case.expected_label, label=label, model_version=str(version), passed=passed,
                      error=error)


def local_smoke_test(config: TuneloopConfig, version: str) -> list[SmokeCheck]:
    """Load ``version`` in this process the way the server does and check the smoke cases on it."""
    from tuneloop import serving

    cases = smoke_cases(config)
    try:
        resolved, directory = serving.fetch_model(config, version)
        model = serving.load_model(directory, resolved)
        probabilities = model.classifier.predict_proba([case.text for case in cases])
    except TuneloopError as error:
        return [SmokeCheck(case.text, case.expected_label, error=error.message) for case in cases]
    labels = model.labels
    checks = []
    for case, row in zip(cases, probabilities.tolist()):
        item = {"label": labels[max(range(len(row)), key=row.__getitem__)], "model_version": resolved,
                "probabilities": dict(zip(labels, row))}
        checks.append(_check(case, item))
    return checks


def _httpx_post(url: str, *, json: Any, headers: dict[str, str], timeout: float) -> tuple[int, Any]:
    import httpx

    response = httpx.post(url, json=json, headers=headers, timeout=timeout)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body


# --------------------------------------------------------------------------------------------
# Deploy outcomes per pipeline run (kept in the state database by tuneloop.champions)


def deploy_outcome(config: TuneloopConfig, pipeline_run: str, version: str) -> DeployResult | None:
    """What ``pipeline_run`` recorded when it deployed ``version`` (None: it has not finished one).

    Raises:
        ServiceUnavailableError: the state database is unreachable.
    """
    from tuneloop import champions

    recorded = champions.read_outcome(config, pipeline_run, version)
    if recorded is None:
        return None
    recorded["smoke"] = [SmokeCheck(**check) for check in recorded.get("smoke", [])]
    return DeployResult(**recorded)


def _record_outcome(config: TuneloopConfig, pipeline_run: str, result: DeployResult) -> None:
    from tuneloop import champions

    champions.record_outcome(config, pipeline_run, result.version, result.status, result.to_dict())


def _repeated(earlier: DeployResult, pipeline_run: str) -> DeployResult:
    """A repeat of a pipeline run's deploy: the recorded failure again, or the recorded success."""
    if earlier.status == FAILED:
        message = (f"pipeline run {pipeline_run} already tried version {earlier.version} and it failed; not rolling "
                   f"it out again: {earlier.message}")
        raise DeploymentError(message, result=earlier)
    earlier.message = f"pipeline run {pipeline_run} already deployed version {earlier.version}: nothing to do " \
                      f"({earlier.message})"
    return earlier


def _label_value(value: str) -> str:
    import re

    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-.")[:63]
    return cleaned or "model"


def _bentoml_command() -> list[str]:
    executable = Path(sys.executable).with_name("bentoml")
    if executable.is_file():
        return [str(executable)]
    return [sys.executable, "-m", "bentoml"]
