"""The two worlds a config can describe, and the checks that keep them apart.

``world: local`` keeps every piece of shared state under ``state_dir`` (SQLite, Parquet files, a
Feast file registry): zero set-up on one machine. ``world: cluster`` runs every pipeline step, serving
replica and drift monitor in its own pod with its own disk, so anything that another pod, a later run
or a retry needs must live in a service. :func:`cluster_problems` names each field whose value would
still be pod-local, one line per field with the value it needs; ``tuneloop compile``, the serving
container and the monitor refuse such a config.

Credentials never belong in the config: :func:`credential_problems` refuses a URI with a user name
or password in it, in either world (they come from Kubernetes Secrets as environment variables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

from tuneloop.errors import ConfigError
from tuneloop.redaction import redact_url

if TYPE_CHECKING:
    from tuneloop.config import TuneloopConfig

OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")
"""URI schemes of object stores that every pod of a cluster can reach."""


def is_object_store_uri(location: str | None) -> bool:
    """Whether ``location`` is an object-store URI (``s3://bucket/key`` and friends)."""
    return bool(location) and urlsplit(str(location)).scheme in OBJECT_STORE_SCHEMES


def _uri_fields(config: "TuneloopConfig") -> Iterator[tuple[str, str | None]]:
    yield "data.texts", config.data.texts
    yield "data.labels", config.data.labels
    yield "features.offline_uri", config.features.offline_uri
    yield "registry.tracking_uri", config.registry.tracking_uri
    yield "deployment.prediction_log_uri", config.deployment.prediction_log_uri
    yield "deployment.service_url", config.deployment.service_url
    yield "monitoring.kubeflow_host", config.monitoring.kubeflow_host


def credential_problems(config: "TuneloopConfig") -> list[str]:
    """One line per URI field that embeds a user name or password (they belong in Secrets)."""
    problems = []
    for field, value in _uri_fields(config):
        if value and "://" in str(value):
            parts = urlsplit(str(value))
            if parts.username or parts.password:
                problems.append(
                    f"{field}: credentials embedded in the URI {redact_url(str(value))}; put them in a Secret and "
                    f"pass them as environment variables instead"
                )
    return problems


def cluster_problems(config: "TuneloopConfig") -> list[str]:
    """Every field of a cluster config whose state would live on one pod's disk, one line each.

    An empty list means the config is coherent for a cluster. A ``world: local`` config is one
    problem by itself: a cluster run of it would share nothing.
    """
    if config.world != "cluster":
        return ["world: 'local' keeps all shared state on one machine; set world: cluster to run on Kubeflow"]
    problems = []
    for field in ("data.texts", "data.labels", "features.offline_uri", "deployment.prediction_log_uri"):
        value = dict(_uri_fields(config))[field]
        if not is_object_store_uri(value):
            problems.append(f"{field}: {value!r} is pod-local; it needs an object-store URI every pod reads "
                            f"(s3://bucket/...)")
    tracking = config.registry.tracking_uri
    if not tracking or urlsplit(tracking).scheme not in ("http", "https"):
        problems.append(f"registry.tracking_uri: {tracking!r} is pod-local; it needs the MLflow server's "
                        f"http(s):// URL")
    if not config.state.database_url_env:
        problems.append("state.database_url_env: unset means SQLite on the pod's disk; it needs the name of the "
                        "env var holding the shared Postgres URL (from a Secret)")
    if not config.features.registry_url_env:
        problems.append("features.registry_url_env: unset means a Feast file registry on the pod's disk; it needs "
                        "the env var holding the SQL registry URL")
    if not config.features.redis_connection_env:
        problems.append("features.redis_connection_env: unset means a SQLite online store on the pod's disk; it "
                        "needs the env var holding the Redis connection string")
    if config.monitoring.trigger == "local":
        problems.append("monitoring.trigger: 'local' would train inside the monitor pod; it needs 'kubeflow' "
                        "(or 'none')")
    if config.alerts.jsonl is not None:
        problems.append(f"alerts.jsonl: {str(config.alerts.jsonl)!r} is a file on one pod; remove it (alerts are "
                        f"recorded in the shared state database)")
    return problems + _training_problems(config)


def _training_problems(config: "TuneloopConfig") -> list[str]:
    """Checkpoints, TrainJob models and the search study: what a retried or fanned-out step reads back."""
    problems = []
    checkpoints = config.training.checkpoint_uri
    if not is_object_store_uri(checkpoints):
        shown = checkpoints if checkpoints else "<state_dir>/checkpoints"
        problems.append(f"training.checkpoint_uri: {shown!r} is pod-local, so a retried finetune (a new pod) "
                        f"cannot resume; it needs an object-store URI (s3://bucket/checkpoints)")
    model_uri = config.training.trainjob.model_uri
    if config.training.backend == "trainjob" and model_uri and not is_object_store_uri(model_uri):
        problems.append(f"training.trainjob.model_uri: {model_uri!r} is pod-local, so finetune cannot read the "
                        f"TrainJob's model; it needs an object-store URI (s3://bucket/models)")
    if config.tuning.in_pipeline and not config.tuning.storage_url_env:
        problems.append("tuning.storage_url_env: unset with tuning.in_pipeline means a study on each trial "
                        "worker's disk; it needs the env var holding the shared Postgres URL of the study "
                        "(from a Secret)")
    return problems


def require_cluster_ready(config: "TuneloopConfig", *, action: str) -> None:
    """Refuse ``action`` (``compile``, ``serve``, ``monitor``) with a config that is not cluster-coherent.

    Raises:
        ConfigError: one line per problem, the first field named.
    """
    problems = cluster_problems(config)
    if problems:
        raise ConfigError(
            f"cannot {action} for a cluster: {len(problems)} field(s) would keep shared state on one pod:\n"
            + "\n".join(f"  - {problem}" for problem in problems),
            field=problems[0].split(":", 1)[0],
        )
