"""Deploy outcomes per (pipeline run, model version), kept in the state database so a retry repeats the verdict."""

from __future__ import annotations

from tuneloop.config import TuneloopConfig
from tuneloop.deployment.common import FAILED, DeployResult, DeploymentError, SmokeCheck


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
