"""Deploy, promote and roll back: put a version live on its target, smoke-test it and move ``champion``."""

from __future__ import annotations

import time
from typing import Any, Callable

from tuneloop import champions
from tuneloop.config import TuneloopConfig
from tuneloop.deployment.bento import build_bento
from tuneloop.deployment.cluster import (
    _live_version,
    _patch_version,
    _read_deployment,
    _wait_for_rollout,
    kubernetes_apps_api,
)
from tuneloop.deployment.common import (
    DEPLOYED,
    FAILED,
    UNCHANGED,
    DeployResult,
    DeploymentError,
    SmokeCheck,
    logger,
)
from tuneloop.deployment.outcomes import _record_outcome, _repeated, deploy_outcome
from tuneloop.deployment.smoke import local_smoke_test, smoke_test
from tuneloop.errors import TuneloopError


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
