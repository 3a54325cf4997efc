"""The MLflow model registry: versions with lineage tags, aliases ``challenger`` and ``champion``.

Locally the registry is SQLite inside the state directory, with artifacts beside it; in a cluster it
is an MLflow tracking server whose credentials come from the environment (``MLFLOW_TRACKING_TOKEN``,
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``), never from the config.

Registering is safe to repeat, as a retried KFP step must be: the MLflow run and the model version
carry the pipeline run's name (tag ``tuneloop.pipeline_run``), and ``register`` first looks for
what an earlier attempt of the same pipeline run left (a run, finished or not; a version, with or
without its aliases) and completes it instead of creating another.

Every registry call goes through :func:`tuneloop.mlflow_calls.call` (re-exported here): an outage
is retried briefly, then raises :class:`~tuneloop.errors.ServiceUnavailableError` so KFP retries
the step; an answer (4xx, not found, refused) is never retried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from tuneloop.artifacts import read_metadata
from tuneloop.config import TuneloopConfig
from tuneloop.errors import RegistryError, ServiceUnavailableError, TuneloopError
from tuneloop.mlflow_calls import as_outage, call, client, first_line, is_remote, outage_service, scrub
from tuneloop.mlflow_calls import safe_uri as _safe_uri

__all__ = ["CHALLENGER", "CHAMPION", "TAG_PREFIX", "ChampionModel", "Registration", "register", "download_champion",
           "download_artifact", "alias_version", "list_versions", "client", "call", "as_outage", "outage_service",
           "is_remote", "scrub"]

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_PREFIX = "tuneloop."
PIPELINE_RUN_TAG = f"{TAG_PREFIX}pipeline_run"
DATASET_ARTIFACT = "data/dataset.parquet"
"""Where the training frame lives inside the MLflow run's artifacts (the drift reference)."""

_PIPELINE_RUN_NAME = re.compile(r"[A-Za-z0-9_.:@/+-]{1,250}")
T = TypeVar("T")


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


# --- register: find this pipeline run's earlier attempt, complete it, or start one ------------------


def register(
    config: TuneloopConfig,
    compressed_dir: str | Path,
    decision: dict,
    dataset_path: str | Path,
    *,
    pipeline_run: str = "",
    aliases: tuple[str, ...] = (CHALLENGER, CHAMPION),
) -> Registration:
    """Register a blessed compressed model and move the given aliases to it; safe to repeat.

    The MLflow run (model files, the training frame at ``data/dataset.parquet``, the gate JSON) and
    the model version carry the tag ``tuneloop.pipeline_run``. A repeat for the same pipeline run
    returns the version an earlier attempt created, finishing what it left undone (a run whose
    logging stopped half-way, a version whose aliases were never set) instead of creating another.

    Args:
        config: registry settings.
        compressed_dir: the Compressed Model directory (logged as the version's artifacts).
        decision: the gate decision; registration refuses anything not blessed.
        dataset_path: the Dataset artifact, logged to the run's artifact store as the training
            frame; the version's ``tuneloop.dataset_uri`` tag points there (``runs:/<id>/...``).
        pipeline_run: the pipeline run's name: lineage, and the key an attempt is found by
            (empty: no earlier attempt is looked for).
        aliases: aliases to point at the version, in order.

    Raises:
        RegistryError: the decision is not blessed, or MLflow refused; a version this attempt
            created is deleted again when its aliases cannot be set.
        ServiceUnavailableError: MLflow or the object store stayed unreachable (KFP retries the step,
            which then completes this attempt).
    """
    if decision.get("blessed") is not True:
        raise RegistryError("refusing to register a model the gate did not bless", stage="registry")
    if pipeline_run and not _PIPELINE_RUN_NAME.fullmatch(pipeline_run):
        raise RegistryError(f"pipeline_run {pipeline_run!r} has characters a registry search cannot quote "
                            f"(allowed: letters, digits and _.:@/+-)", stage="registry", field="pipeline_run")
    metadata = read_metadata(compressed_dir)
    mlflow = client(config)
    name = config.registry.model_name
    try:
        call(config, f"ensuring registered model {name!r}", _ensure_registered_model, mlflow, name)
        experiment_id = _experiment_id(mlflow, config)
        run_id = _attempt_run(mlflow, config, experiment_id, pipeline_run, compressed_dir, dataset_path, metadata,
                              decision)
        version, created = call(config, f"creating a version of {name!r}", _find_or_create_version, mlflow, name,
                                run_id, _lineage_tags(metadata, decision, pipeline_run, run_id),
                                f"{metadata.get('base_model')} fine-tuned by tuneloop ({metadata.get('precision')})")
    except TuneloopError:
        raise
    except Exception as error:
        raise RegistryError(f"MLflow at {_safe_uri(config)} refused to register {name!r}: "
                            f"{scrub(first_line(error))}", stage="registry") from error
    if not created:
        print(f"register: version {version} of {name} was created by an earlier attempt of {pipeline_run}; "
              f"completing it", flush=True)
    _set_aliases(mlflow, config, version, aliases, delete_on_failure=created)
    print(f"register: {name} version {version} -> aliases {', '.join(aliases)}", flush=True)
    return Registration(name, str(version), list(aliases), run_id)


def _set_aliases(mlflow, config: TuneloopConfig, version: str, aliases: tuple[str, ...], *,
                 delete_on_failure: bool) -> None:
    name = config.registry.model_name
    try:
        for alias in aliases:
            call(config, f"pointing alias {alias} at version {version}", mlflow.set_registered_model_alias,
                 name, alias, version)
    except Exception as error:
        if delete_on_failure:
            _delete_version_quietly(mlflow, config, version)
        if isinstance(error, ServiceUnavailableError):
            raise
        raise RegistryError(f"could not set aliases {aliases} on version {version} of {name!r}: "
                            f"{scrub(first_line(error))}", stage="registry") from error


def _delete_version_quietly(mlflow, config: TuneloopConfig, version: str) -> None:
    """Remove a version whose aliases could not be set; if even that fails, a retry completes it."""
    try:
        mlflow.delete_model_version(config.registry.model_name, version)
    except Exception as error:  # the retry of this step finds the version by its run and completes it
        print(f"register: could not delete the unfinished version {version} ({scrub(first_line(error))}); "
              f"a retry of this step completes it", flush=True)


def _attempt_run(mlflow, config, experiment_id, pipeline_run, compressed_dir, dataset_path, metadata,
                 decision) -> str:
    """This pipeline run's MLflow run, fully logged: an earlier attempt's when there is one."""
    run = call(config, "looking for an earlier attempt's run", _earlier_run, mlflow, experiment_id, pipeline_run)
    if run is not None and run.info.status == "FINISHED":
        return run.info.run_id
    if run is None:
        run = call(config, "creating the MLflow run", _find_or_create_run, mlflow, experiment_id, pipeline_run)
    else:
        print(f"register: completing run {run.info.run_id} that an earlier attempt left {run.info.status}",
              flush=True)
    _log_run(mlflow, config, run, compressed_dir, dataset_path, metadata, decision)
    return run.info.run_id


def _earlier_run(mlflow, experiment_id: str, pipeline_run: str):
    """The newest active run tagged with ``pipeline_run`` (one that has a version comes first)."""
    if not pipeline_run:
        return None
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    finished = [run for run in runs if run.info.status == "FINISHED"]
    return (finished or list(runs) or [None])[0]


def _find_or_create_run(mlflow, experiment_id: str, pipeline_run: str):
    """Create the run; a retried create whose first answer was lost finds the first one instead."""
    earlier = _earlier_run(mlflow, experiment_id, pipeline_run)
    if earlier is not None:
        return earlier
    return mlflow.create_run(experiment_id, run_name=pipeline_run or None, tags={PIPELINE_RUN_TAG: pipeline_run})


def _log_run(mlflow, config, run, compressed_dir, dataset_path, metadata, decision) -> None:
    """Log (or re-log: files are overwritten, existing metrics kept) everything, then finish the run."""
    run_id = run.info.run_id
    logged_metrics = set((run.data.metrics or {}) if run.data else {})
    steps: list[tuple[str, Callable[[], Any]]] = [
        (f"logging metric test_{metric}", lambda m=metric, v=value: mlflow.log_metric(run_id, f"test_{m}", float(v)))
        for metric, value in decision.get("test_metrics", {}).items() if f"test_{metric}" not in logged_metrics
    ]
    steps += [
        ("logging params", lambda: mlflow.log_batch(run_id, params=_params(metadata))),
        ("uploading the model files", lambda: mlflow.log_artifacts(run_id, str(compressed_dir), artifact_path="model")),
        *_calibration_steps(mlflow, run_id, metadata, decision),
        ("uploading the training frame", lambda: _log_dataset(mlflow, run_id, dataset_path)),
        ("uploading the gate decision", lambda: mlflow.log_text(run_id, json.dumps(decision, indent=2), "gate.json")),
        ("checking the training frame landed", lambda: _require_dataset_artifact(mlflow, run_id)),
        ("finishing the run", lambda: mlflow.set_terminated(run_id, "FINISHED")),
    ]
    for action, step in steps:
        try:
            call(config, f"{action} (run {run_id})", step)
        except TuneloopError:
            raise  # the run stays unfinished; the retry of this step completes it
        except Exception as error:
            raise RegistryError(f"could not log the model run to MLflow ({action}): {scrub(first_line(error))}",
                                stage="registry") from error


def _calibration_steps(mlflow, run_id: str, metadata: dict, decision: dict) -> list[tuple[str, Callable[[], Any]]]:
    """Write the gate's temperature into the registered ``model/tuneloop.json``: every runtime applies it."""
    from tuneloop.artifacts import METADATA_FILE
    from tuneloop.calibration import calibrated_metadata

    calibrated = calibrated_metadata(metadata, decision)
    if calibrated is None:
        return []
    text = json.dumps(calibrated, indent=2, sort_keys=True, default=str)
    return [(f"recording temperature {calibrated['temperature']} in model/{METADATA_FILE}",
             lambda: mlflow.log_text(run_id, text, f"model/{METADATA_FILE}"))]


def _params(metadata: dict):
    from mlflow.entities import Param

    return [Param("base_model", str(metadata.get("base_model"))), Param("precision", str(metadata.get("precision")))]


def _log_dataset(mlflow, run_id: str, dataset_path: str | Path) -> None:
    """Log the training frame as ``data/dataset.parquet``, whatever the KFP artifact file is called."""
    import shutil
    import tempfile

    source = Path(dataset_path)
    source = source / "dataset.parquet" if source.is_dir() else source
    if not source.is_file():
        raise RegistryError(f"the training frame {source} does not exist; nothing to record as lineage",
                            stage="registry", path=str(source))
    with tempfile.TemporaryDirectory(prefix="tuneloop-dataset-") as scratch:
        target = Path(scratch) / Path(DATASET_ARTIFACT).name
        shutil.copyfile(source, target)
        mlflow.log_artifact(run_id, str(target), artifact_path=str(Path(DATASET_ARTIFACT).parent))


def _require_dataset_artifact(mlflow, run_id: str) -> None:
    folder, file_name = DATASET_ARTIFACT.rsplit("/", 1)
    if not any(Path(info.path).name == file_name for info in mlflow.list_artifacts(run_id, folder)):
        raise RegistryError(f"run {run_id} has no {DATASET_ARTIFACT} after uploading it", stage="registry")


def _find_or_create_version(mlflow, name: str, run_id: str, tags: dict[str, str], description: str):
    """(version, created): the version made from ``run_id``, created now only when there is none."""
    existing = [v for v in mlflow.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    if existing:
        return str(min(existing, key=lambda v: int(v.version)).version), False
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/model"
    version = mlflow.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    return str(version.version), True


def _experiment_id(mlflow, config: TuneloopConfig) -> str:
    """The experiment's id; its artifact root must be one every pod of the world reaches.

    Locally with SQLite (or a database URL) artifacts go to ``<state_dir>/mlartifacts``; with a
    tracking server they go to the server's artifact root (an object store in a cluster), and an
    experiment whose root is a local path is refused there: lineage would point into one pod.
    """
    from mlflow.exceptions import MlflowException

    name = config.registry.experiment
    experiment = call(config, f"reading experiment {name!r}", mlflow.get_experiment_by_name, name)
    if experiment is None:
        location = None if is_remote(config) else (Path(config.state_dir) / "mlartifacts").resolve().as_uri()
        try:
            call(config, f"creating experiment {name!r}", mlflow.create_experiment, name, artifact_location=location)
        except MlflowException as error:
            if str(error.error_code) != "RESOURCE_ALREADY_EXISTS":  # a lost answer of our own create
                raise
        experiment = call(config, f"reading experiment {name!r}", mlflow.get_experiment_by_name, name)
    _require_shared_artifact_root(config, experiment.artifact_location)
    return experiment.experiment_id


def _require_shared_artifact_root(config: TuneloopConfig, location: str) -> None:
    scheme = location.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", location) else ""
    pod_local = scheme in ("", "file")
    if pod_local and (is_remote(config) or config.world == "cluster"):
        raise RegistryError(
            f"experiment {config.registry.experiment!r} stores artifacts at {location}, a path on one machine: "
            f"lineage and model files would exist only there. Give the tracking server an object-store artifact "
            f"root (--artifacts-destination s3://...) and use a new registry.experiment",
            stage="registry", field="registry.experiment")


def _ensure_registered_model(mlflow, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_registered_model(name)
        return
    except MlflowException as error:
        if str(error.error_code) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        mlflow.create_registered_model(name, description="Managed by tuneloop")
    except MlflowException as error:
        if str(error.error_code) != "RESOURCE_ALREADY_EXISTS":  # created meanwhile, or our own lost answer
            raise


def _lineage_tags(metadata: dict, decision: dict, pipeline_run: str, run_id: str) -> dict[str, str]:
    return {
        PIPELINE_RUN_TAG: pipeline_run,
        f"{TAG_PREFIX}data_fingerprint": str(metadata.get("data_fingerprint", "")),
        f"{TAG_PREFIX}base_model": str(metadata.get("base_model", "")),
        f"{TAG_PREFIX}runtime": str(metadata.get("runtime", "")),
        f"{TAG_PREFIX}precision": str(metadata.get("precision", "")),
        f"{TAG_PREFIX}metrics": json.dumps(decision.get("test_metrics", {})),
        f"{TAG_PREFIX}gate": json.dumps({"blessed": decision["blessed"], "checks": decision.get("checks", [])}),
        f"{TAG_PREFIX}dataset_uri": f"runs:/{run_id}/{DATASET_ARTIFACT}",
        f"{TAG_PREFIX}privacy": json.dumps(metadata.get("privacy") or {"dp": False}),
        f"{TAG_PREFIX}gate_intervals": json.dumps({
            check["name"]: {key: check.get(key) for key in ("value", "low", "high", "confidence", "status")}
            for check in decision.get("checks", []) if check.get("low") is not None}),
        f"{TAG_PREFIX}calibration": json.dumps(decision.get("calibration") or {}),
        f"{TAG_PREFIX}slices": json.dumps(decision.get("slices") or []),
    }


# --- reading: champion, aliases, versions, artifacts ----------------------------------------------


def download_champion(config: TuneloopConfig, directory: Path):
    """Download the champion's compressed model into ``directory``; None when there is no champion.

    Raises:
        RegistryError: the champion's files are missing or MLflow refused (a decision: the gate
            then does not bless).
        ServiceUnavailableError: MLflow or the object store stayed unreachable (retry the step).
    """
    version = alias_version(config, CHAMPION)
    if version is None:
        return None
    mlflow = client(config)
    model_version = _answer(config, f"reading champion version {version}", mlflow.get_model_version,
                            config.registry.model_name, version)
    local = download_artifact(config, model_version.source, directory, what=f"champion version {version}")
    return ChampionModel(version=str(version), directory=local)


def download_artifact(config: TuneloopConfig, uri: str, directory: str | Path, *, what: str) -> Path:
    """Download the artifact file or folder at ``uri`` (``runs:/``, ``s3://``, ``mlflow-artifacts:/``...).

    Raises:
        RegistryError: nothing is stored at ``uri`` (named with ``what``), or MLflow refused.
        ServiceUnavailableError: MLflow or the object store stayed unreachable.
    """
    from mlflow.artifacts import download_artifacts, list_artifacts

    parent, _, leaf = uri.rstrip("/").rpartition("/")
    listing = _answer(config, f"listing {what}", list_artifacts, artifact_uri=parent,
                      tracking_uri=config.tracking_uri)
    if not any(Path(info.path).name == leaf for info in listing or []):
        raise RegistryError(f"{what}: nothing is stored at {scrub(uri)} (deleted, or registered from a path on "
                            f"another machine)", stage="registry", path=scrub(uri))
    Path(directory).mkdir(parents=True, exist_ok=True)
    local = _answer(config, f"downloading {what}", download_artifacts, artifact_uri=uri, dst_path=str(directory),
                    tracking_uri=config.tracking_uri)
    return Path(local)


def _answer(config: TuneloopConfig, action: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """:func:`call`, with any answer that is not an outage turned into a one-line RegistryError."""
    try:
        return call(config, action, function, *args, **kwargs)
    except TuneloopError:
        raise
    except Exception as error:
        raise RegistryError(f"{action} at {_safe_uri(config)} failed: {scrub(first_line(error))}",
                            stage="registry") from error


def alias_version(config: TuneloopConfig, alias: str) -> str | None:
    """The version an alias points to, or None when the model or alias does not exist.

    Raises:
        ServiceUnavailableError: the registry stayed unreachable.
        RegistryError: the registry refused the request.
    """
    registered = _registered_model(config)
    version = (registered.aliases or {}).get(alias) if registered is not None else None
    return str(version) if version is not None else None


def _registered_model(config: TuneloopConfig):
    """The registered model, or None when it does not exist yet."""
    from mlflow.exceptions import MlflowException

    mlflow = client(config)
    name = config.registry.model_name
    try:
        return call(config, f"reading registered model {name!r}", mlflow.get_registered_model, name)
    except MlflowException as error:
        if str(error.error_code) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"the registry at {_safe_uri(config)} refused to read {name!r}: "
                            f"{scrub(first_line(error))}", stage="registry") from error


def list_versions(config: TuneloopConfig) -> list[dict]:
    """Every version of the configured model, newest first: version, aliases, metrics, lineage."""
    registered = _registered_model(config)
    if registered is None:
        return []
    name = config.registry.model_name
    aliases_by_version: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases_by_version.setdefault(str(version), []).append(alias)
    versions = _answer(config, f"listing versions of {name!r}", client(config).search_model_versions,
                       f"name = '{name}'")
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
        "pipeline_run": tags.get(PIPELINE_RUN_TAG, ""),
        "created": version.creation_timestamp,
        "trained_on_erased_data": json.loads(tags.get(f"{TAG_PREFIX}trained_on_erased_data", "[]")),
        "privacy": json.loads(tags.get(f"{TAG_PREFIX}privacy", "{}")),
    }


