"""Retraining runs started by drift, at most one per cooldown.

:func:`trigger_retraining` starts the training pipeline for a drift report:

- ``monitoring.trigger: kubeflow``: a run of the newest uploaded version of
  ``monitoring.training_pipeline_name`` through ``kfp.Client`` (:func:`tuneloop.kubeflow.run_latest`)
  on ``monitoring.kubeflow_host`` (empty: ``$KF_PIPELINES_ENDPOINT``), named
  ``tuneloop-retrain-<report id>`` so the KFP UI says which drift report started it;
- ``local``: a ``kfp.local`` run of ``monitoring.training_pipeline_file`` through
  :func:`tuneloop.orchestration.run_local` (synchronous: it returns when training has finished); the
  run's output folder gets ``tuneloop-trigger.json`` naming the report;
- ``none``: nothing starts (alerts only).

The launcher is injectable (``launcher=``) for tests.

The trigger ledger records every run started: when, by which report, which run. Two backends
(``monitoring.ledger``):

- ``file`` (default): ``<state_dir>/monitoring/retraining-ledger.json``;
- ``registry``: a tag (``tuneloop.retraining_ledger``) on the registered model, for monitors whose
  state directory does not survive between runs (a CronJob with an ``emptyDir``). Tags are not
  transactional across hosts: run such monitors one at a time (``concurrencyPolicy: Forbid``).

Either way, the check, the launch and the ledger write happen under an exclusive file lock in the
state directory, so concurrent monitors on one host start exactly one run. The rules:

- a report that already started a run never starts another (``duplicate``: a retried step);
- within ``monitoring.cooldown_hours`` of the last run started, nothing starts (``cooldown``);
- a monitor that cannot take the lock within :data:`LOCK_TIMEOUT_SECONDS` (another one is starting a
  run right now, e.g. a long local training) starts nothing (``busy``);
- a launch that fails raises :class:`RetrainingError` and leaves the ledger untouched, so the next
  monitor run tries again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tuneloop.config import TuneloopConfig
from tuneloop.errors import PipelineError, TuneloopError

STAGE = "retraining"
LEDGER_FILE = "retraining-ledger.json"
LEDGER_TAG = "tuneloop.retraining_ledger"
LOCK_TIMEOUT_SECONDS = 10.0
FILE_LEDGER_ENTRIES = 200
REGISTRY_LEDGER_ENTRIES = 10
"""A registered-model tag holds a few kilobytes: keep the last entries only."""
TRIGGER_RECORD = "tuneloop-trigger.json"
"""Written into a local run's output folder: which drift report started it."""

STARTED, COOLDOWN, DUPLICATE, BUSY, DISABLED = "started", "cooldown", "duplicate", "busy", "disabled"


class RetrainingError(PipelineError):
    """A retraining run could not be started (the ledger is left unmarked)."""


@dataclass(frozen=True)
class RetrainingRequest:
    """Why a run is wanted: the drift report (id and where it is), the model version it watched."""

    report_id: str
    report_path: str = ""
    model_version: str = ""
    reasons: tuple[str, ...] = ()

    @property
    def run_name(self) -> str:
        """The name a cluster run gets: ``tuneloop-retrain-<report id>``."""
        return f"tuneloop-retrain-{self.report_id}"


@dataclass
class LaunchedRun:
    """A run a launcher started: its id and name in the orchestrator."""

    run_id: str
    run_name: str
    mode: str
    details: dict = field(default_factory=dict)


@dataclass
class TriggerOutcome:
    """What :func:`trigger_retraining` did.

    ``status``: ``started`` (this call started ``run_id``), ``cooldown`` (a run started within the
    cooldown; ``run_id`` is that run), ``duplicate`` (this report already started ``run_id``),
    ``busy`` (another monitor holds the ledger lock) or ``disabled`` (``monitoring.trigger: none``).
    """

    status: str
    report_id: str
    mode: str
    message: str
    run_id: str = ""
    run_name: str = ""
    started_at: str = ""
    cooldown_until: str = ""
    ledger: str = ""

    @property
    def started(self) -> bool:
        return self.status == STARTED

    def to_dict(self) -> dict:
        return asdict(self)


Launcher = Callable[[TuneloopConfig, RetrainingRequest], LaunchedRun]


def trigger_retraining(
    config: TuneloopConfig,
    request: RetrainingRequest,
    *,
    launcher: Launcher | None = None,
    now: dt.datetime | None = None,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> TriggerOutcome:
    """Start one retraining run for a drift report, unless the ledger says not to.

    Args:
        config: ``monitoring`` says how (``trigger``), how often (``cooldown_hours``) and where the
            ledger is (``ledger``).
        request: the drift report that asks for the run.
        launcher: starts the run (default: by ``monitoring.trigger``, :func:`launch_local` or
            :func:`launch_kubeflow`).
        now: the current time (UTC), for tests.
        lock_timeout: seconds to wait for another monitor holding the ledger lock.

    Raises:
        RetrainingError: the launch failed; nothing was recorded, so the next call retries.
    """
    mode = config.monitoring.trigger
    now = _utc(now)
    ledger = ledger_for(config)
    if mode == "none" and launcher is None:
        return TriggerOutcome(DISABLED, request.report_id, mode, "retraining is disabled (monitoring.trigger: none)",
                              ledger=ledger.location)
    launch = launcher or LAUNCHERS[mode]
    cooldown = dt.timedelta(hours=config.monitoring.cooldown_hours)
    with _exclusive(lock_path(config), lock_timeout) as acquired:
        if not acquired:
            return TriggerOutcome(
                BUSY, request.report_id, mode,
                f"another monitor is starting a retraining run right now (lock {lock_path(config)}); not starting one",
                ledger=ledger.location,
            )
        entries = ledger.load()
        previous = next((e for e in reversed(entries) if e.get("report_id") == request.report_id), None)
        if previous is not None:
            return _from_entry(DUPLICATE, previous, request, mode, ledger, cooldown,
                               f"report {request.report_id} already started run {previous.get('run_id')}")
        last = entries[-1] if entries else None
        if last is not None and now - _parse_time(last["started_at"]) < cooldown:
            until = _parse_time(last["started_at"]) + cooldown
            return _from_entry(
                COOLDOWN, last, request, mode, ledger, cooldown,
                f"retraining run {last.get('run_id')} started at {last['started_at']} (report "
                f"{last.get('report_id')}); cooldown of {config.monitoring.cooldown_hours:g}h lasts until "
                f"{until.isoformat()}",
            )
        try:
            run = launch(config, request)
        except TuneloopError as error:
            raise RetrainingError(
                f"could not start the retraining run for drift report {request.report_id} ({mode}): {error.message}",
                stage=STAGE, path=error.path, field=error.field,
            ) from error
        except Exception as error:  # a launcher's own failure: still one clean error
            raise RetrainingError(
                f"could not start the retraining run for drift report {request.report_id} ({mode}): "
                f"{type(error).__name__}: {error}",
                stage=STAGE,
            ) from error
        entry = {
            "report_id": request.report_id,
            "report_path": request.report_path,
            "model_version": request.model_version,
            "mode": run.mode,
            "run_id": run.run_id,
            "run_name": run.run_name,
            "started_at": now.isoformat(),
        }
        try:
            ledger.save(entries + [entry])
        except Exception as error:
            raise RetrainingError(
                f"retraining run {run.run_id} started for drift report {request.report_id}, but the ledger "
                f"{ledger.location} could not record it ({error}); the next monitor run may start another",
                stage=STAGE, path=ledger.location,
            ) from error
    print(f"retraining: started {run.mode} run {run.run_id} ({run.run_name}) for drift report {request.report_id}",
          flush=True)
    return TriggerOutcome(
        STARTED, request.report_id, run.mode,
        f"started {run.mode} run {run.run_id} ({run.run_name})",
        run_id=run.run_id, run_name=run.run_name, started_at=entry["started_at"],
        cooldown_until=(now + cooldown).isoformat(), ledger=ledger.location,
    )


def _from_entry(status, entry, request, mode, ledger, cooldown, message) -> TriggerOutcome:
    started = entry.get("started_at", "")
    until = (_parse_time(started) + cooldown).isoformat() if started else ""
    return TriggerOutcome(status, request.report_id, entry.get("mode", mode), message,
                          run_id=entry.get("run_id", ""), run_name=entry.get("run_name", ""),
                          started_at=started, cooldown_until=until, ledger=ledger.location)


# --------------------------------------------------------------------------------------------
# Launchers


def launch_local(config: TuneloopConfig, request: RetrainingRequest) -> LaunchedRun:
    """Run the training pipeline through ``kfp.local`` (returns when it has finished).

    Raises:
        PipelineError: the pipeline file is missing or a task failed.
        ConfigError, DataError: the preflight checks of :func:`tuneloop.orchestration.run_local`.
    """
    from tuneloop.orchestration import run_local

    pipeline_file = training_pipeline_path(config)
    print(f"retraining: running {pipeline_file} locally (kfp.local) for drift report {request.report_id}", flush=True)
    finished = run_local(config, pipeline_file)
    record = {"report_id": request.report_id, "report_path": request.report_path,
              "model_version": request.model_version, "reasons": list(request.reasons)}
    with contextlib.suppress(OSError):
        (Path(finished.root) / TRIGGER_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return LaunchedRun(run_id=finished.name, run_name=finished.name, mode="local",
                       details={"root": str(finished.root), "seconds": round(finished.seconds, 1)})


def launch_kubeflow(config: TuneloopConfig, request: RetrainingRequest) -> LaunchedRun:
    """Start a run of the newest uploaded training pipeline version on Kubeflow Pipelines.

    Raises:
        ConfigError: no host (neither ``monitoring.kubeflow_host`` nor ``$KF_PIPELINES_ENDPOINT``).
        KubeflowError: the host is unreachable, refuses the credentials, or knows no such pipeline.
    """
    from tuneloop import kubeflow

    monitoring = config.monitoring
    client = kubeflow.connect(monitoring.kubeflow_host or "", namespace=monitoring.kubeflow_namespace)
    run_id = kubeflow.run_latest(client, monitoring.training_pipeline_name, experiment=monitoring.kubeflow_experiment,
                                 run_name=request.run_name)
    return LaunchedRun(run_id=run_id, run_name=request.run_name, mode="kubeflow",
                       details={"pipeline": monitoring.training_pipeline_name})


LAUNCHERS: dict[str, Launcher] = {"local": launch_local, "kubeflow": launch_kubeflow}


def training_pipeline_path(config: TuneloopConfig) -> Path:
    """``monitoring.training_pipeline_file``: a shipped pipeline's name (``training``, found in the
    installed ``pipelines`` package), else a file path, absolute or against the working directory.

    Raises:
        PipelineError: the file does not exist.
    """
    from tuneloop.orchestration import SHIPPED_PIPELINES, shipped_pipeline_file

    configured = config.monitoring.training_pipeline_file
    if configured in SHIPPED_PIPELINES:
        return shipped_pipeline_file(configured)
    path = Path(configured).expanduser()
    if path.is_file():
        return path.resolve()
    raise PipelineError(
        f"training pipeline file not found: {configured} (monitoring.training_pipeline_file; the shipped "
        f"pipeline is 'training')",
        stage=STAGE, path=str(configured), field="monitoring.training_pipeline_file",
    )


# --------------------------------------------------------------------------------------------
# The ledger


class FileLedger:
    """The ledger as a JSON file: ``{"triggers": [entry, ...]}``, oldest first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RetrainingError(f"the trigger ledger {self.path} is unreadable: {error}", stage=STAGE,
                                  path=str(self.path)) from error
        return list(data.get("triggers", []))

    def save(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        payload = {"triggers": entries[-FILE_LEDGER_ENTRIES:]}
        temporary.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        os.replace(temporary, self.path)


class RegistryLedger:
    """The ledger as a tag of the registered model (compact entries, the last few only)."""

    def __init__(self, config: TuneloopConfig) -> None:
        self.config = config
        self.location = f"registered model {config.registry.model_name!r}, tag {LEDGER_TAG}"

    def load(self) -> list[dict]:
        from mlflow.exceptions import MlflowException

        from tuneloop import registry

        try:
            model = registry.client(self.config).get_registered_model(self.config.registry.model_name)
        except MlflowException as error:
            if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
                return []
            raise RetrainingError(f"cannot read the trigger ledger ({self.location}): {error}", stage=STAGE) from error
        text = (model.tags or {}).get(LEDGER_TAG)
        if not text:
            return []
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as error:
            raise RetrainingError(f"the trigger ledger ({self.location}) is not JSON: {error}", stage=STAGE) from error

    def save(self, entries: list[dict]) -> None:
        from tuneloop import registry

        compact = [{key: entry.get(key, "") for key in ("report_id", "mode", "run_id", "run_name", "started_at",
                                                         "model_version")}
                   for entry in entries[-REGISTRY_LEDGER_ENTRIES:]]
        registry.client(self.config).set_registered_model_tag(
            self.config.registry.model_name, LEDGER_TAG, json.dumps(compact, separators=(",", ":")))


def ledger_for(config: TuneloopConfig) -> FileLedger | RegistryLedger:
    """The configured ledger backend."""
    if config.monitoring.ledger == "registry":
        return RegistryLedger(config)
    return FileLedger(Path(config.state_dir) / "monitoring" / LEDGER_FILE)


def read_ledger(config: TuneloopConfig) -> list[dict]:
    """Every run the ledger records, oldest first."""
    return ledger_for(config).load()


def lock_path(config: TuneloopConfig) -> Path:
    return Path(config.state_dir) / "monitoring" / ".retraining.lock"


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when it stays taken for ``timeout`` s."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process guard
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _utc(moment: dt.datetime | None) -> dt.datetime:
    moment = moment or dt.datetime.now(dt.timezone.utc)
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment.astimezone(dt.timezone.utc)


def _parse_time(text: str) -> dt.datetime:
    return _utc(dt.datetime.fromisoformat(text))

