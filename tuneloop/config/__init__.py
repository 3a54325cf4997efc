"""The `tuneloop.yaml` configuration: one tree of strict pydantic models.

A wrong key or a value of the wrong type fails at load time with the dotted path of the bad field
(``training.epochs: Input should be a valid integer``). Relative data paths are resolved against
the directory of the config file; the state directory (``.tuneloop/`` by default) is resolved
against the working directory, as documented in the README.

Secrets never live here: credentials and webhook URLs are read from environment variables whose
*names* the config may hold (``*_env`` fields).
"""

from __future__ import annotations

from tuneloop.config.base import StrictModel
from tuneloop.config.compression import (
    COMPRESSION_VARIANTS,
    CompressionConfig,
    DistillationConfig,
    PruningConfig,
)
from tuneloop.config.data import DataConfig, FeaturesConfig, SplitConfig, ValidationConfig
from tuneloop.config.deployment import DeploymentConfig, SmokeTestConfig
from tuneloop.config.evaluation import EvaluationConfig, RegistryConfig, SliceRuleConfig, SlicesConfig
from tuneloop.config.kubeflow import (
    DEFAULT_SECRETS,
    PIPELINE_STEPS,
    GpuConfig,
    KubeflowConfig,
    ResourcesConfig,
    SecretEnvConfig,
    TolerationConfig,
)
from tuneloop.config.loading import (
    TuneloopConfig,
    is_uri,
    load_config,
    parse_config,
    resolve_base_model,
    resolve_config_paths,
)
from tuneloop.config.operations import AlertsConfig, MonitoringConfig, StateConfig
from tuneloop.config.privacy import PII_TYPES, DifferentialPrivacyConfig, ErasureConfig, PrivacyConfig
from tuneloop.config.training import PRETRAINED_PACKAGE_MODEL, LoraConfig, TrainingConfig, TrainJobConfig
from tuneloop.config.tuning import FloatRange, IntRange, SearchSpaceConfig, TuningConfig

__all__ = [
    "AlertsConfig",
    "COMPRESSION_VARIANTS",
    "CompressionConfig",
    "DEFAULT_SECRETS",
    "DataConfig",
    "DeploymentConfig",
    "DifferentialPrivacyConfig",
    "DistillationConfig",
    "ErasureConfig",
    "EvaluationConfig",
    "FeaturesConfig",
    "FloatRange",
    "GpuConfig",
    "IntRange",
    "KubeflowConfig",
    "LoraConfig",
    "MonitoringConfig",
    "PII_TYPES",
    "PIPELINE_STEPS",
    "PRETRAINED_PACKAGE_MODEL",
    "PrivacyConfig",
    "PruningConfig",
    "RegistryConfig",
    "ResourcesConfig",
    "SearchSpaceConfig",
    "SecretEnvConfig",
    "SliceRuleConfig",
    "SlicesConfig",
    "SmokeTestConfig",
    "SplitConfig",
    "StateConfig",
    "StrictModel",
    "TolerationConfig",
    "TrainJobConfig",
    "TrainingConfig",
    "TuneloopConfig",
    "TuningConfig",
    "ValidationConfig",
    "is_uri",
    "load_config",
    "parse_config",
    "resolve_base_model",
    "resolve_config_paths",
]
