"""Retraining runs started by drift, at most one per cooldown, across every monitor pod.

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

The trigger ledger is a table of the shared state database (:mod:`tuneloop.state_store`: SQLite in
``state_dir`` on one machine, Postgres in a cluster), one row per drift report that started a run:
when, which run. A monitor first *claims* the trigger in a short transaction that holds the
project's ledger lock (a Postgres advisory lock, SQLite's write lock), then launches outside it, then
records the run. So any number of monitors on any number of pods start exactly one run, and a long
local training run holds no database lock. The rules, checked under the lock:

- a report that already started a run never starts another (``duplicate``: a retried step finds
  its own earlier trigger);
- while another monitor's claim is live (its heartbeat is younger than :data:`CLAIM_LEASE_SECONDS`),
  nothing starts (``busy``); so too when the lock stays taken for ``state.lock_timeout_s``;
- within ``monitoring.cooldown_hours`` of the last run started, nothing starts (``cooldown``);
- a launch that fails raises :class:`RetrainingError` and removes the claim, so the next monitor run
  tries again.

A claim whose monitor died mid-launch goes stale. The next monitor looks for that attempt's run in
Kubeflow Pipelines by its name before acting: found, it is recorded as started (and the cooldown
applies); not found, the stale claim is dropped.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from tuneloop import state_store
from tuneloop.config import TuneloopConfig
from tuneloop.errors import PipelineError, TuneloopError
from tuneloop.state_store import StateBusyError, retraining_ledger

STAGE = "retraining"
TRIGGER_RECORD = "tuneloop-trigger.json"
"""Written into a local run's output folder: which drift report started it."""
CLAIM_LEASE_SECONDS = 120.0
"""A claim whose heartbeat is older than this belongs to a monitor that died mid-launch."""
HEARTBEAT_SECONDS = 20.0

STARTED, COOLDOWN, DUPLICATE, BUSY, DISABLED = "started", "cooldown", "duplicate", "busy", "disabled"
LAUNCHING = "launching"
"""A ledger row's status while its monitor is starting the run."""


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
    ``busy`` (another monitor is starting a run right now) or ``disabled`` (``monitoring.trigger: none``).
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
RunFinder = Callable[[TuneloopConfig, str], "str | None"]


def trigger_retraining(
    config: TuneloopConfig,
    request: RetrainingRequest,
    *,
    launcher: Launcher | None = None,
    find_run: RunFinder | None = None,
    now: dt.datetime | None = None,
) -> TriggerOutcome:
    """Start one retraining run for a drift report, unless the ledger says not to.

    Args:
        config: ``monitoring`` says how (``trigger``) and how often (``cooldown_hours``); ``state``
            where the ledger is.
        request: the drift report that asks for the run.
        launcher: starts the run (default: by ``monitoring.trigger``, :func:`launch_local` or
            :func:`launch_kubeflow`).
        find_run: looks a run up by name in the orchestrator, for claims left by a monitor that died
            mid-launch (default: :func:`find_kubeflow_run` with ``trigger: kubeflow``, else none).
        now: the current time (UTC), for tests.

    Raises:
        RetrainingError: the launch failed; nothing was recorded, so the next call retries.
        ServiceUnavailableError: the shared state database is unreachable.
    """
    mode = config.monitoring.trigger
    now = _utc(now)
    ledger = Ledger(config)
    if mode == "none" and launcher is None:
        return TriggerOutcome(DISABLED, request.report_id, mode, "retraining is disabled (monitoring.trigger: none)",
                              ledger=ledger.location)
    launch = launcher or LAUNCHERS[mode]
    if find_run is None and launcher is None and mode == "kubeflow":
        find_run = find_kubeflow_run
    cooldown = dt.timedelta(hours=config.monitoring.cooldown_hours)
    try:
        decision = ledger.claim(request, now=now, cooldown=cooldown, find_run=find_run)
    except StateBusyError as error:
        return TriggerOutcome(BUSY, request.report_id, mode,
                              f"another monitor holds the retraining ledger lock ({error.message}); not starting one",
                              ledger=ledger.location)
    if decision.outcome is not None:
        return decision.outcome
    with ledger.heartbeat(decision.claim_id):
        try:
            run = launch(config, request)
        except Exception as error:  # an interrupt leaves the claim to go stale and be looked up by name
            ledger.release(decision.claim_id)
            known = isinstance(error, TuneloopError)
            why = error.message if known else f"{type(error).__name__}: {error}"
            raise RetrainingError(
                f"could not start the retraining run for drift report {request.report_id} ({mode}): {why}",
                stage=STAGE, path=error.path if known else None, field=error.field if known else None,
            ) from error
    started_at = now.isoformat()
    ledger.record_started(decision.claim_id, run, started_at)
    print(f"retraining: started {run.mode} run {run.run_id} ({run.run_name}) for drift report {request.report_id}",
          flush=True)
    return TriggerOutcome(
        STARTED, request.report_id, run.mode, f"started {run.mode} run {run.run_id} ({run.run_name})",
        run_id=run.run_id, run_name=run.run_name, started_at=started_at,
        cooldown_until=(now + cooldown).isoformat(), ledger=ledger.location,
    )


def read_ledger(config: TuneloopConfig) -> list[dict]:
    """Every trigger the ledger records for this project (started runs and live claims), oldest first."""
    return Ledger(config).entries()


# --------------------------------------------------------------------------------------------
# The ledger


@dataclass
class Claim:
    """The ledger's answer under the lock: an outcome (nothing to launch) or the claim to launch for."""

    outcome: TriggerOutcome | None = None
    claim_id: int | None = None


class Ledger:
    """The retraining ledger of one project in the shared state database."""

    def __init__(self, config: TuneloopConfig) -> None:
        self.config = config
        self.project = config.name
        self.lock = f"tuneloop-retraining-ledger:{config.name}"
        self.owner = uuid.uuid4().hex
        self.location = f"{retraining_ledger.name} in {state_store.location(config)}"

    def entries(self) -> list[dict]:
        with state_store.transaction(self.config) as connection:
            rows = connection.execute(self._select().order_by(retraining_ledger.c.id)).mappings().all()
        return [_entry(row) for row in rows]

    def claim(self, request: RetrainingRequest, *, now: dt.datetime, cooldown: dt.timedelta,
              find_run: RunFinder | None) -> Claim:
        """Under the ledger lock: decide duplicate / busy / cooldown, else insert this report's claim."""
        with state_store.transaction(self.config, lock=self.lock) as connection:
            rows = [dict(row) for row in
                    connection.execute(self._select().order_by(retraining_ledger.c.id)).mappings().all()]
            rows = [row for row in rows if self._settle_stale(connection, row, find_run, now)]
            own = next((row for row in rows if row["report_id"] == request.report_id), None)
            if own is not None and own["status"] == STARTED:
                return Claim(self._outcome(DUPLICATE, own, request, cooldown,
                                           f"report {request.report_id} already started run {own['run_id']}"))
            live = next((row for row in rows if row["status"] == LAUNCHING), None)
            if live is not None:
                return Claim(self._outcome(
                    BUSY, live, request, cooldown,
                    f"another monitor is starting a retraining run for drift report {live['report_id']} right now "
                    f"(claimed at {live['claimed_at']}); not starting one"))
            started = [row for row in rows if row["status"] == STARTED]
            last = started[-1] if started else None
            if last is not None and now - _parse_time(last["started_at"]) < cooldown:
                until = _parse_time(last["started_at"]) + cooldown
                return Claim(self._outcome(
                    COOLDOWN, last, request, cooldown,
                    f"retraining run {last['run_id']} started at {last['started_at']} (report {last['report_id']}); "
                    f"cooldown of {self.config.monitoring.cooldown_hours:g}h lasts until {until.isoformat()}"))
            stamp = _wall_clock()
            inserted = connection.execute(retraining_ledger.insert().values(
                project=self.project, report_id=request.report_id, status=LAUNCHING,
                report_path=request.report_path, model_version=request.model_version, mode="", run_id="",
                run_name=request.run_name, claimed_at=stamp, heartbeat_at=stamp, started_at="", owner=self.owner,
            ))
            return Claim(claim_id=inserted.inserted_primary_key[0])

    def _settle_stale(self, connection, row: dict, find_run: RunFinder | None, now: dt.datetime) -> bool:
        """A claim whose monitor died mid-launch: record the run it started if the orchestrator knows
        it by name, else drop the claim. Returns whether the row still counts."""
        if row["status"] != LAUNCHING or time.time() - _parse_time(row["heartbeat_at"]).timestamp() \
                < CLAIM_LEASE_SECONDS:
            return True
        run_id = find_run(self.config, row["run_name"]) if find_run is not None and row["run_name"] else None
        if run_id:
            values = {"status": STARTED, "run_id": run_id, "mode": self.config.monitoring.trigger,
                      "started_at": row["claimed_at"]}
            connection.execute(retraining_ledger.update().where(retraining_ledger.c.id == row["id"]).values(**values))
            row.update(values)
            print(f"retraining: the interrupted trigger of report {row['report_id']} had started run {run_id}; "
                  f"recorded it", flush=True)
            return True
        connection.execute(retraining_ledger.delete().where(retraining_ledger.c.id == row["id"]))
        print(f"retraining: dropped the stale claim of report {row['report_id']} (its monitor stopped before "
              f"starting a run)", flush=True)
        return False

    @contextlib.contextmanager
    def heartbeat(self, claim_id: int):
        """Keep the claim live while the launch runs (a local training run takes minutes)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(TuneloopError):
                    with state_store.transaction(self.config) as connection:
                        connection.execute(retraining_ledger.update().where(retraining_ledger.c.id == claim_id)
                                           .values(heartbeat_at=_wall_clock()))

        thread = threading.Thread(target=beat, name="tuneloop-ledger-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def release(self, claim_id: int) -> None:
        """Remove a claim whose launch failed (best effort: an unreachable database lets it go stale)."""
        try:
            with state_store.transaction(self.config) as connection:
                connection.execute(retraining_ledger.delete().where(retraining_ledger.c.id == claim_id))
        except TuneloopError as error:
            print(f"retraining: could not remove the claim ({error.message}); it expires after "
                  f"{CLAIM_LEASE_SECONDS:g}s", flush=True)

    def record_started(self, claim_id: int, run: LaunchedRun, started_at: str) -> None:
        try:
            with state_store.transaction(self.config, lock=self.lock) as connection:
                connection.execute(retraining_ledger.update().where(retraining_ledger.c.id == claim_id).values(
                    status=STARTED, mode=run.mode, run_id=run.run_id, run_name=run.run_name, started_at=started_at,
                    heartbeat_at=_wall_clock()))
        except TuneloopError as error:
            raise RetrainingError(
                f"retraining run {run.run_id} started, but the ledger ({self.location}) could not record it "
                f"({error.message}); the next monitor looks the run up by its name {run.run_name!r}",
                stage=STAGE,
            ) from error

    def _select(self) -> sa.Select:
        return sa.select(retraining_ledger).where(retraining_ledger.c.project == self.project)

    def _outcome(self, status: str, row: dict, request: RetrainingRequest, cooldown: dt.timedelta,
                 message: str) -> TriggerOutcome:
        started = row.get("started_at") or ""
        until = (_parse_time(started) + cooldown).isoformat() if started else ""
        return TriggerOutcome(status, request.report_id, row.get("mode") or self.config.monitoring.trigger, message,
                              run_id=row.get("run_id", ""), run_name=row.get("run_name", ""), started_at=started,
                              cooldown_until=until, ledger=self.location)


def _entry(row) -> dict:
    keys = ("report_id", "status", "report_path", "model_version", "mode", "run_id", "run_name", "started_at",
            "claimed_at")
    return {key: row[key] for key in keys}


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


def find_kubeflow_run(config: TuneloopConfig, run_name: str) -> str | None:
    """The id of the Kubeflow Pipelines run called ``run_name`` (None when there is none).

    Raises:
        KubeflowError: the host is unreachable or refuses the credentials.
    """
    from tuneloop import kubeflow

    monitoring = config.monitoring
    client = kubeflow.connect(monitoring.kubeflow_host or "", namespace=monitoring.kubeflow_namespace)
    predicate = {"operation": "EQUALS", "key": "display_name", "string_value": run_name}
    with kubeflow.api_errors(client, f"looking up run {run_name!r}"):
        response = client.list_runs(page_size=10, filter=json.dumps({"predicates": [predicate]}))
    runs = [run for run in response.runs or [] if run.display_name == run_name]
    return runs[0].run_id if runs else None


def _wall_clock() -> str:
    """The real time (claims and heartbeats; the injectable ``now`` is only for the cooldown)."""
    return dt.datetime.now(dt.UTC).isoformat()


def _utc(moment: dt.datetime | None) -> dt.datetime:
    moment = moment or dt.datetime.now(dt.UTC)
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _parse_time(text: str) -> dt.datetime:
    return _utc(dt.datetime.fromisoformat(text))
