"""Config sections of the compiled pipeline in a cluster: images, resources, GPU nodes, Secrets, retries."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneloop.config.base import StrictModel


class ResourcesConfig(StrictModel):
    """Kubernetes requests and limits of one step (quantities as Kubernetes writes them)."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


class TolerationConfig(StrictModel):
    """A pod toleration, e.g. for the taint on GPU nodes."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class GpuConfig(StrictModel):
    """Which steps run on GPU nodes, and how those nodes are found."""

    steps: list[Literal["finetune", "compress"]] = []
    count: int = Field(1, ge=1)
    accelerator: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = {}
    tolerations: list[TolerationConfig] = [TolerationConfig(key="nvidia.com/gpu")]
    shm_size: str = "8Gi"


PIPELINE_STEPS = (
    "validate_data", "retrieve_features", "finetune", "compress", "evaluate", "register", "deploy",
    "report_rejection", "notify", "monitor_drift", "notify_drift", "trigger_retraining",
    "search_trials", "best_parameters",
)
"""The steps of the shipped pipelines, as ``kubeflow.secrets[].steps`` names them."""


class SecretEnvConfig(StrictModel):
    """One environment variable filled from a key of a Kubernetes Secret (the value never leaves the
    cluster: only these names appear in the compiled YAML). The Secret is required: a step whose
    Secret is missing fails at pod start with Kubernetes' own message. ``steps`` lists the steps that
    get it (unset: every step)."""

    secret: str
    key: str
    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    steps: list[str] | None = Field(None, description="Steps that need this Secret; unset: all steps.")

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, steps: list[str] | None) -> list[str] | None:
        unknown = sorted(set(steps or ()) - set(PIPELINE_STEPS))
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {list(PIPELINE_STEPS)}")
        return steps

    def applies_to(self, step: str) -> bool:
        """Whether ``step`` gets this Secret."""
        return self.steps is None or step in self.steps


DEFAULT_SECRETS = [
    SecretEnvConfig(secret="tuneloop-mlflow", key="token", env="MLFLOW_TRACKING_TOKEN"),
    SecretEnvConfig(secret="tuneloop-storage", key="access-key-id", env="AWS_ACCESS_KEY_ID"),
    SecretEnvConfig(secret="tuneloop-storage", key="secret-access-key", env="AWS_SECRET_ACCESS_KEY"),
    SecretEnvConfig(secret="tuneloop-alerts", key="webhook-url", env="TUNELOOP_WEBHOOK_URL"),
    SecretEnvConfig(secret="tuneloop-state", key="database-url", env="TUNELOOP_DATABASE_URL"),
    SecretEnvConfig(secret="tuneloop-feast", key="registry-url", env="FEAST_REGISTRY_URL",
                    steps=["retrieve_features"]),
    SecretEnvConfig(secret="tuneloop-feast", key="redis-connection", env="FEAST_REDIS_CONNECTION",
                    steps=["retrieve_features"]),
    SecretEnvConfig(secret="tuneloop-serving", key="api-key", env="TUNELOOP_API_KEY", steps=["deploy"]),
]


class KubeflowConfig(StrictModel):
    """How the compiled pipeline runs in a cluster (read at compile time; ``kfp.local`` ignores it)."""

    image: str = "ghcr.io/tuneloop/tuneloop:0.1.0"
    gpu_image: str = "ghcr.io/tuneloop/tuneloop-gpu:0.1.0"
    gpu: GpuConfig = GpuConfig()
    resources: dict[str, ResourcesConfig] = {
        "default": ResourcesConfig(cpu_request="1", memory_request="2Gi", memory_limit="4Gi"),
        "finetune": ResourcesConfig(cpu_request="4", memory_request="8Gi", memory_limit="16Gi"),
        "compress": ResourcesConfig(cpu_request="2", memory_request="4Gi", memory_limit="8Gi"),
    }
    secrets: list[SecretEnvConfig] = DEFAULT_SECRETS
    retries: int = Field(2, ge=0, le=10, description="Retries of transient steps (data, registry, deploy).")

    @field_validator("resources")
    @classmethod
    def _known_steps(cls, resources: dict[str, ResourcesConfig]) -> dict[str, ResourcesConfig]:
        known = {"default", "validate_data", "retrieve_features", "finetune", "compress", "evaluate", "register", "deploy"}
        unknown = sorted(set(resources) - known)
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {sorted(known)}")
        return resources
