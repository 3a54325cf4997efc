"""Configs for compiling the shipped pipelines: `tuneloop compile --config` takes only a coherent
cluster config (world: cluster, every piece of shared state in a service)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tuneloop.config import TuneloopConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S_CONFIG = ROOT / "k8s" / "base" / "config" / "tuneloop.yaml"

CLUSTER = {
    "name": "sms",
    "world": "cluster",
    "data": {"texts": "s3://bucket/sms/texts.parquet", "labels": "s3://bucket/sms/labels.parquet",
             "classes": ["ham", "spam"]},
    "features": {"offline_uri": "s3://bucket/feast", "registry_url_env": "FEAST_REGISTRY_URL",
                 "redis_connection_env": "FEAST_REDIS_CONNECTION"},
    "training": {"checkpoint_uri": "s3://bucket/checkpoints"},
    "registry": {"tracking_uri": "http://mlflow.tuneloop.svc:5000"},
    "deployment": {"target": "kubernetes", "prediction_log_uri": "s3://bucket/predictions"},
    "monitoring": {"trigger": "kubeflow", "ledger": "database"},
    "state": {"database_url_env": "TUNELOOP_DATABASE_URL"},
}
"""The smallest coherent cluster config (the kubeflow section keeps its defaults)."""


def cluster_raw(**sections) -> dict:
    """A copy of :data:`CLUSTER` with whole sections (or top-level keys) replaced or added."""
    raw = copy.deepcopy(CLUSTER)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def cluster_config(**sections) -> TuneloopConfig:
    """A coherent cluster config, with sections merged over :data:`CLUSTER`."""
    return parse_config(cluster_raw(**sections), source="test")


def k8s_config() -> TuneloopConfig:
    """The config the k8s ConfigMap ships (what `make compile` bakes in)."""
    return parse_config(yaml.safe_load(K8S_CONFIG.read_text(encoding="utf-8")), source=str(K8S_CONFIG))
