"""The MLflow model registry: versions with lineage tags, aliases ``challenger`` and ``champion``.

Locally the registry is SQLite inside the state directory, with artifacts beside it; in a cluster it
is an MLflow tracking server whose credentials come from the environment (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), never from the config.

Registering is all-or-nothing: if anything fails after the version was created, the version is
deleted again and no alias moves.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tuneloop.artifacts import read_metadata
from tuneloop.config import TuneloopConfig
from tuneloop.errors import RegistryError

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_PREFIX = "tuneloop."


@dataclass
class ChampionModel:
    """The current champion: its registry version and a local copy of its compressed model."""

    version: str
    directory: Path


@dataclass
class Registration:
    """A registered version and the aliases it now holds."""

    model_name: str
    version: str
    aliases: list[str]
    run_id: str


def client(config: TuneloopConfig):
    """An ``MlflowClient`` for the configured registry (the SQLite file's folder is created)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = config.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(
    config: TuneloopConfig,
    compressed_dir: str | Path,
    decision: dict,
    dataset_path: str | Path,
    *,
    pipeline_run: str = "",
    aliases: tuple[str, ...] = (CHALLENGER, CHAMPION),
) -> Registration:
    """Register a blessed compressed model and move the given aliases to it.

    Args:
        config: registry settings.
        compressed_dir: the Compressed Model directory (logged as the version's artifacts).
        decision: the gate decision; registration refuses anything not blessed.
        dataset_path: the Dataset artifact, logged beside the model as its training frame.
        pipeline_run: the pipeline run's name, recorded as lineage.
        aliases: aliases to point at the new version, in order.

    Raises:
        RegistryError: the decision is not blessed, or MLflow refused; nothing is left behind.
    """
    if decision.get("blessed") is not True:
        raise RegistryError("refusing to register a model the gate did not bless", stage="registry")
    metadata = read_metadata(compressed_dir)
    mlflow = client(config)
    run_id = _log_run(mlflow, config, compressed_dir, dataset_path, metadata, decision, pipeline_run)
    artifact_uri = mlflow.get_run(run_id).info.artifact_uri
    _ensure_registered_model(mlflow, config.registry.model_name)
    version = mlflow.create_model_version(
        config.registry.model_name,
        source=f"{artifact_uri}/model",
        run_id=run_id,
        tags=_lineage_tags(metadata, decision, pipeline_run, f"{artifact_uri}/data/dataset.parquet"),
        description=f"{metadata.get('base_model')} fine-tuned by tuneloop ({metadata.get('precision')})",
    ).version
    try:
        for alias in aliases:
            mlflow.set_registered_model_alias(config.registry.model_name, alias, version)
    except Exception as error:
        mlflow.delete_model_version(config.registry.model_name, version)
        raise RegistryError(f"could not set aliases {aliases} on version {version}: {error}", stage="registry")
    print(f"register: {config.registry.model_name} version {version} -> aliases {', '.join(aliases)}", flush=True)
    return Registration(config.registry.model_name, str(version), list(aliases), run_id)


def _log_run(mlflow, config, compressed_dir, dataset_path, metadata, decision, pipeline_run) -> str:
    experiment_id = _experiment_id(mlflow, config)
    run = mlflow.create_run(experiment_id, run_name=pipeline_run or None, tags={f"{TAG_PREFIX}pipeline_run": pipeline_run})
    run_id = run.info.run_id
    try:
        for name, value in decision.get("test_metrics", {}).items():
            mlflow.log_metric(run_id, f"test_{name}", float(value))
        mlflow.log_param(run_id, "base_model", metadata.get("base_model"))
        mlflow.log_param(run_id, "precision", metadata.get("precision"))
        mlflow.log_artifacts(run_id, str(compressed_dir), artifact_path="model")
        _log_dataset(mlflow, run_id, dataset_path)
        mlflow.log_text(run_id, json.dumps(decision, indent=2), "gate.json")
        mlflow.set_terminated(run_id, "FINISHED")
    except Exception as error:
        mlflow.set_terminated(run_id, "FAILED")
        raise RegistryError(f"could not log the model run to MLflow: {error}", stage="registry") from error
    return run_id


def _log_dataset(mlflow, run_id: str, dataset_path: str | Path) -> None:
    """Log the training frame as ``data/dataset.parquet``, whatever the KFP artifact file is called."""
    import shutil
    import tempfile

    source = Path(dataset_path)
    with tempfile.TemporaryDirectory(prefix="tuneloop-dataset-") as scratch:
        target = Path(scratch) / "dataset.parquet"
        shutil.copyfile(source / "dataset.parquet" if source.is_dir() else source, target)
        mlflow.log_artifact(run_id, str(target), artifact_path="data")


def _experiment_id(mlflow, config: TuneloopConfig) -> str:
    experiment = mlflow.get_experiment_by_name(config.registry.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if config.tracking_uri.startswith("sqlite:///"):
        location = (Path(config.state_dir) / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(config.registry.experiment, artifact_location=location)


def _ensure_registered_model(mlflow, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_registered_model(name)
    except MlflowException:
        mlflow.create_registered_model(name, description="Managed by tuneloop")


def _lineage_tags(metadata: dict, decision: dict, pipeline_run: str, dataset_uri: str) -> dict[str, str]:
    return {
        f"{TAG_PREFIX}pipeline_run": pipeline_run,
        f"{TAG_PREFIX}data_fingerprint": str(metadata.get("data_fingerprint", "")),
        f"{TAG_PREFIX}base_model": str(metadata.get("base_model", "")),
        f"{TAG_PREFIX}runtime": str(metadata.get("runtime", "")),
        f"{TAG_PREFIX}precision": str(metadata.get("precision", "")),
        f"{TAG_PREFIX}metrics": json.dumps(decision.get("test_metrics", {})),
        f"{TAG_PREFIX}gate": json.dumps({"blessed": decision["blessed"], "checks": decision.get("checks", [])}),
        f"{TAG_PREFIX}dataset_uri": dataset_uri,
    }


def download_champion(config: TuneloopConfig, directory: Path):
    """Download the champion's compressed model into ``directory``; None when there is no champion.

    Raises:
        RegistryError: the registry cannot be reached or the champion's files cannot be fetched.
    """
    version = alias_version(config, CHAMPION)
    if version is None:
        return None
    mlflow = client(config)
    model_version = mlflow.get_model_version(config.registry.model_name, version)
    try:
        from mlflow.artifacts import download_artifacts

        local = download_artifacts(artifact_uri=model_version.source, dst_path=str(directory), tracking_uri=config.tracking_uri)
    except Exception as error:
        raise RegistryError(f"cannot download champion version {version}: {error}", stage="registry") from error
    return ChampionModel(version=str(version), directory=Path(local))


def alias_version(config: TuneloopConfig, alias: str) -> str | None:
    """The version an alias points to, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    mlflow = client(config)
    try:
        registered = mlflow.get_registered_model(config.registry.model_name)
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            return None
        raise RegistryError(f"registry unreachable at {_safe_uri(config)}: {error}", stage="registry") from error
    version = (registered.aliases or {}).get(alias)
    return str(version) if version is not None else None


def list_versions(config: TuneloopConfig) -> list[dict]:
    """Every version of the configured model, newest first: version, aliases, metrics, lineage."""
    from mlflow.exceptions import MlflowException

    mlflow = client(config)
    name = config.registry.model_name
    try:
        registered = mlflow.get_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            return []
        raise RegistryError(f"registry unreachable at {_safe_uri(config)}: {error}", stage="registry") from error
    aliases_by_version: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases_by_version.setdefault(str(version), []).append(alias)
    versions = mlflow.search_model_versions(f"name = '{name}'")
    rows = [_version_row(v, sorted(aliases_by_version.get(str(v.version), []))) for v in versions]
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def _version_row(version, aliases: list[str]) -> dict:
    tags = version.tags or {}
    return {
        "version": str(version.version),
        "aliases": aliases,
        "metrics": json.loads(tags.get(f"{TAG_PREFIX}metrics", "{}")),
        "precision": tags.get(f"{TAG_PREFIX}precision", ""),
        "data_fingerprint": tags.get(f"{TAG_PREFIX}data_fingerprint", ""),
        "pipeline_run": tags.get(f"{TAG_PREFIX}pipeline_run", ""),
        "created": version.creation_timestamp,
    }


def _safe_uri(config: TuneloopConfig) -> str:
    """The tracking URI without any credentials embedded in it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(config.tracking_uri)
    if not (parts.password or parts.username):
        return config.tracking_uri  # urlunsplit would turn sqlite:///abs into sqlite://abs
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
