"""The guarantees of the cluster world (issue 9), each checked against the running rehearsal.

Every check returns a :class:`Outcome` with the evidence it saw (counts, versions, exit codes). A
check never passes on missing evidence: an exception inside it is a FAILED outcome naming the error.
The checks run in the order of :data:`ORDER`; later ones use what earlier ones left (a champion,
running replicas, campaign traffic in the prediction log).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rehearsal.cluster import MONITOR_SECRETS, PREDICTION_LOG_URI, SERVING_SECRETS, World
from rehearsal.pods import RunningPod
from rehearsal.services import free_port
from rehearsal.traffic import campaign_texts, logged_request_ids, post, wait_ready

IN_DISTRIBUTION = [
    "Are we still meeting for lunch tomorrow?",
    "I'll call you when I get home tonight",
    "Can you pick up some milk on the way back?",
    "Sorry, running ten minutes late, start without me",
    "WINNER!! You have won a free prize, call 09061701461 now to claim",
    "Thanks for dinner yesterday, it was lovely",
]


@dataclass
class Outcome:
    guarantee: str
    passed: bool
    evidence: str


@dataclass
class Rehearsal:
    """State shared between the checks."""

    world: World
    replicas: dict[str, tuple[RunningPod, str]] = field(default_factory=dict)
    champion: str | None = None
    pipeline_run: str | None = None
    kfp_runs_before_monitors: int = 0

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.world.mlflow.url, registry_uri=self.world.mlflow.url)

    @property
    def model_name(self) -> str:
        return self.world.config().registry.model_name

    def alias_version(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow().get_model_version_by_alias(self.model_name, alias).version
        except MlflowException:
            return None

    def versions(self) -> list:
        return list(self.mlflow().search_model_versions(f"name = '{self.model_name}'"))

    def webhook_kinds(self) -> list[str]:
        kinds = []
        for received in self.world.webhook.posts():
            try:
                kinds.append(received.json().get("tuneloop", {}).get("kind", "?"))
            except ValueError:
                kinds.append("?")
        return kinds


# 1 --------------------------------------------------------------------------------------------------


def training_registers_and_deploys(rehearsal: Rehearsal) -> Outcome:
    """The training pipeline runs end to end, every task in its own pod, and leaves a champion."""
    from kfp import local

    from tuneloop.orchestration import load_pipeline

    name = "1. training pipeline end to end: registers and deploys a champion"
    world = rehearsal.world
    config = world.config()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(world.root / "artifact-store"),
               raise_on_error=True)
    pipeline = load_pipeline("training")
    started = time.monotonic()
    try:
        with world.cluster.kfp_pods():
            pipeline(config_json=config.to_json())
    except RuntimeError as error:
        failed = [pod for pod in world.cluster.pods if pod.name.startswith("task-") and pod.returncode != 0]
        where = f"; {failed[-1].name}: {_error_line(failed[-1].log)}" if failed else ""
        return Outcome(name, False, f"pipeline failed after {time.monotonic() - started:.0f}s: "
                                    f"{str(error).splitlines()[0][:200]}{where}")
    champion = rehearsal.alias_version("champion")
    if champion is None:
        return Outcome(name, False, "pipeline finished but no champion alias in the MLflow registry")
    version = rehearsal.mlflow().get_model_version(rehearsal.model_name, champion)
    rehearsal.champion = champion
    rehearsal.pipeline_run = version.tags.get("tuneloop.pipeline_run")
    tasks = [pod.name.removeprefix("task-") for pod in world.cluster.pods if pod.name.startswith("task-")]
    artifacts = len(world.s3.keys("tuneloop-mlflow"))
    return Outcome(name, True, f"{len(tasks)} task pods ({', '.join(tasks)}) in {time.monotonic() - started:.0f}s; "
                               f"champion = version {champion} of run {rehearsal.pipeline_run}; "
                               f"{artifacts} MLflow artifacts in s3://tuneloop-mlflow")


def _error_line(log: str) -> str:
    """The last ``tuneloop.errors...: message`` line of a pod log (else its last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tuneloop.") and "Error" in line.split(":", 1)[0]]
    return (errors or lines or ["(empty log)"])[-1][:300]


# 2 --------------------------------------------------------------------------------------------------


def start_replicas(rehearsal: Rehearsal) -> str | None:
    """Two serving replicas, each a pod with its own folder; None when both are ready, else why not."""
    world = rehearsal.world
    env = world.secrets_env(SERVING_SECRETS)
    for replica in ("a", "b"):
        port = free_port()
        pod = world.cluster.start(f"serving-{replica}", [_tuneloop(), "serve", "--config", str(world.config_path),
                                                         "--port", str(port)], env=env)
        rehearsal.replicas[replica] = (pod, f"http://127.0.0.1:{port}")
    problems = []
    for replica, (pod, url) in rehearsal.replicas.items():
        if not wait_ready(url, pod.alive, timeout=420):
            tail = "\n".join(pod.log.strip().splitlines()[-3:])
            problems.append(f"replica {replica} not ready (exit {pod.process.poll()}): {tail[-400:]}")
    return "; ".join(problems) or None


def _tuneloop() -> str:
    import sys

    return str(Path(sys.executable).with_name("tuneloop"))


def replicas_share_feedback(rehearsal: Rehearsal) -> Outcome:
    """Replica A serves; replica B accepts feedback for A's requests."""
    name = "2. two replicas serve; feedback to B for requests A served is accepted"
    if rehearsal.champion is None:
        return Outcome(name, False, "no champion to serve (guarantee 1 failed)")
    problem = start_replicas(rehearsal)
    if problem:
        return Outcome(name, False, problem)
    (_, url_a), (_, url_b) = rehearsal.replicas["a"], rehearsal.replicas["b"]
    key = rehearsal.world.api_key
    texts = IN_DISTRIBUTION * 5
    served_a = post(f"{url_a}/predict", {"texts": texts}, key)
    served_b = post(f"{url_b}/predict", {"texts": IN_DISTRIBUTION}, key)
    if served_a.status != 200 or served_b.status != 200:
        return Outcome(name, False, f"predict answered A={served_a.status} B={served_b.status}: {served_a.body!s:.200}")
    ids = [item["request_id"] for item in served_a.body]
    labels = [item["label"] for item in served_a.body]
    deadline, statuses = time.monotonic() + 30, []
    while time.monotonic() < deadline:  # A flushes its log every deployment.log_flush_seconds
        statuses = [post(f"{url_b}/feedback", {"request_id": rid, "label": label}, key).status
                    for rid, label in zip(ids[:1], labels[:1])]
        if statuses == [200]:
            break
        time.sleep(1)
    statuses += [post(f"{url_b}/feedback", {"request_id": rid, "label": label}, key).status
                 for rid, label in zip(ids[1:], labels[1:])]
    unknown = post(f"{url_b}/feedback", {"request_id": uuid.uuid4().hex, "label": labels[0]}, key).status
    accepted = statuses.count(200)
    passed = accepted == len(ids) and unknown == 404
    return Outcome(name, passed, f"A served {len(ids)}, B served {len(IN_DISTRIBUTION)}; B accepted feedback for "
                                 f"{accepted}/{len(ids)} of A's ids (statuses {sorted(set(statuses))}); "
                                 f"an id that exists nowhere -> {unknown}")


# 6 --------------------------------------------------------------------------------------------------


def serving_survives_postgres_restart(rehearsal: Rehearsal, requests: int = 120) -> Outcome:
    """A burst across both replicas while Postgres restarts: every request answered and logged."""
    name = "6. Postgres restarted during a serving burst: all answered, all in the prediction log"
    if len(rehearsal.replicas) != 2 or not all(pod.alive() for pod, _ in rehearsal.replicas.values()):
        return Outcome(name, False, "the serving replicas are not running (guarantee 2 failed)")
    urls = [url for _, url in rehearsal.replicas.values()]
    key = rehearsal.world.api_key
    sent = threading.Event()
    replies: list = []

    def one(number: int):
        reply = post(f"{urls[number % 2]}/predict", {"texts": [f"{IN_DISTRIBUTION[number % 6]} ({number})"]}, key)
        if number == requests // 3:
            sent.set()
        return reply

    restart_error: list[str] = []

    def restart():
        sent.wait(timeout=120)
        try:
            rehearsal.world.postgres.restart(down_seconds=3.0)
        except Exception as error:  # noqa: BLE001 (reported as evidence)
            restart_error.append(str(error))

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for number, reply in enumerate(pool.map(one, range(requests))):
            replies.append(reply)
            if number % 20 == 0:
                time.sleep(0.2)  # spread the burst over the restart
    restarter.join(timeout=120)
    if restart_error:
        return Outcome(name, False, f"could not restart Postgres: {restart_error[0]}")
    answered = [r for r in replies if r.status == 200]
    ids = {item["request_id"] for r in answered for item in r.body}
    statuses = sorted({r.status for r in replies})
    found: set[str] = set()
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        found = ids & logged_request_ids(rehearsal.world.s3, PREDICTION_LOG_URI)
        if len(found) == len(ids):
            break
        time.sleep(2)
    passed = len(answered) == requests and len(found) == requests
    return Outcome(name, passed, f"{len(answered)}/{requests} answered 200 (statuses {statuses}) while Postgres was "
                                 f"down 3s; {len(found)}/{len(ids)} of their request ids in {PREDICTION_LOG_URI}")


def send_campaign(rehearsal: Rehearsal, rows: int = 200) -> str | None:
    """Campaign traffic through both replicas, then stop them cleanly (flushing their logs)."""
    key = rehearsal.world.api_key
    texts = campaign_texts(rows)
    problems = []
    for number, (_, url) in enumerate(rehearsal.replicas.values()):
        half = texts[number::2]
        for start in range(0, len(half), 25):
            reply = post(f"{url}/predict", {"texts": half[start:start + 25]}, key)
            if reply.status != 200:
                problems.append(f"{url} answered {reply.status}")
    stop_replicas(rehearsal)
    return "; ".join(problems) or None


def stop_replicas(rehearsal: Rehearsal) -> None:
    for pod, _ in rehearsal.replicas.values():
        pod.stop()


# 3 and 4 --------------------------------------------------------------------------------------------


def _monitor(rehearsal: Rehearsal, name: str, *, database_url: str | None = None, window: str = "200"):
    world = rehearsal.world
    env = world.secrets_env(MONITOR_SECRETS)
    if database_url:
        env["TUNELOOP_DATABASE_URL"] = database_url
    return world.cluster.run(name, [_tuneloop(), "monitor", "--config", str(world.config_path), "--window", window],
                             env=env, timeout=600)


def monitors_start_one_run_and_deliver_spooled_alert(rehearsal: Rehearsal) -> tuple[Outcome, Outcome]:
    """Three monitors in turn, the first with the webhook down: one retraining run; the alert the
    first spooled is delivered by the second from another folder."""
    name_runs = "3. three monitors from fresh dirs on campaign traffic start exactly one run"
    name_spool = "4. webhook down: alert spooled in shared storage, delivered by the next monitor"
    if rehearsal.champion is None:
        reason = "no champion to monitor (guarantee 1 failed)"
        return Outcome(name_runs, False, reason), Outcome(name_spool, False, reason)
    world = rehearsal.world
    runs_before = len(world.kfp.runs)
    world.webhook.stop()
    first_started = time.time()
    first = _monitor(rehearsal, "monitor-1-webhook-down")
    first_ended = time.time()
    world.webhook.start()
    posts_before = len(world.webhook.posts())
    second = _monitor(rehearsal, "monitor-2")
    third = _monitor(rehearsal, "monitor-3")
    runs = len(world.kfp.runs) - runs_before
    codes = f"exit codes {first.returncode}, {second.returncode}, {third.returncode}"
    outcome_runs = Outcome(name_runs, runs == 1 and first.returncode in (10, 12),
                           f"{runs} run(s) created on the KFP API; {codes}"
                           + ("" if first.returncode in (10, 12) else f"; monitor 1: {first.tail(2)[-300:]}"))
    delivered = []
    for received in world.webhook.posts()[posts_before:]:
        alert = received.json().get("tuneloop", {}) if isinstance(received.json(), dict) else {}
        created = _timestamp(alert.get("time"))
        if created is not None and first_started <= created <= first_ended:
            delivered.append(alert.get("kind"))
    outcome_spool = Outcome(name_spool, bool(delivered),
                            f"monitor 1 (webhook down) exit {first.returncode}; alerts created during it and "
                            f"received after it: {delivered or 'none'}; monitor 2 exit {second.returncode}")
    return outcome_runs, outcome_spool


def _timestamp(text: str | None) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def racing_monitors_start_one_run(rehearsal: Rehearsal) -> Outcome:
    """Two monitors at the same moment, against a fresh state database: one run between them."""
    name = "3. two monitors started at the same moment start one run"
    if rehearsal.champion is None:
        return Outcome(name, False, "no champion to monitor (guarantee 1 failed)")
    world = rehearsal.world
    fresh = world.postgres.create_database("state_race")
    before = len(world.kfp.runs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda n: _monitor(rehearsal, f"monitor-race-{n}", database_url=fresh), (1, 2)))
    runs = len(world.kfp.runs) - before
    codes = [result.returncode for result in results]
    return Outcome(name, runs == 1, f"{runs} run(s) created by two simultaneous monitors on an empty ledger; "
                                    f"exit codes {codes}")


# 5 --------------------------------------------------------------------------------------------------

FAULT_SITECUSTOMIZE = '''\
"""Rehearsal fault: the pod dies right after MLflow created the model version (before any alias)."""
import os

from mlflow.store.model_registry.rest_store import RestStore

_create = RestStore.create_model_version


def _create_then_die(self, *args, **kwargs):
    version = _create(self, *args, **kwargs)
    print(f"[rehearsal fault] created version {version.version}; killing the pod", flush=True)
    os._exit(137)


RestStore.create_model_version = _create_then_die
'''


def register_killed_then_retried(rehearsal: Rehearsal) -> Outcome:
    """``register`` killed between creating the version and setting its alias, then retried."""
    name = "5. register killed after creating the version, retried: one version, with its alias"
    cluster = rehearsal.world.cluster
    if "register" not in cluster.task_commands:
        return Outcome(name, False, "the training run never reached register (guarantee 1 failed)")
    run_name = f"rehearsal-register-{uuid.uuid4().hex[:8]}"
    before = {v.version for v in rehearsal.versions()}
    fault_dir = rehearsal.world.root / "fault-register"
    fault_dir.mkdir(exist_ok=True)
    (fault_dir / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
    killed = cluster.rerun_task("register", "register-killed", parameters={"pipeline_run": run_name},
                                extra_env={"PYTHONPATH": str(fault_dir)})
    fault_hit = "[rehearsal fault] created version" in killed.log
    retried = cluster.rerun_task("register", "register-retry", parameters={"pipeline_run": run_name})
    new = [v for v in rehearsal.versions() if v.version not in before]
    challenger = rehearsal.alias_version("challenger")
    tagged = [v.version for v in new if v.tags.get("tuneloop.pipeline_run") == run_name]
    passed = (fault_hit and killed.returncode == 137 and retried.returncode == 0 and len(new) == 1
              and tagged == [new[0].version] and challenger == new[0].version)
    return Outcome(name, passed, f"attempt 1 exit {killed.returncode} (fault {'hit' if fault_hit else 'NOT hit'}), "
                                 f"retry exit {retried.returncode}; new versions {[v.version for v in new]}, tagged "
                                 f"with the run {tagged}; challenger -> {challenger}"
                                 + ("" if retried.returncode == 0 else f"; retry log: {retried.tail(2)[-300:]}"))


# 7 --------------------------------------------------------------------------------------------------


def evaluate_with_mlflow_down(rehearsal: Rehearsal) -> Outcome:
    """``evaluate`` while the MLflow server is down: a retryable failure, never a rejection."""
    name = "7. MLflow unreachable during evaluate: retryable failure, no 'model rejected' alert"
    world = rehearsal.world
    if "evaluate" not in world.cluster.task_commands:
        return Outcome(name, False, "the training run never reached evaluate (guarantee 1 failed)")
    rejected_before = rehearsal.webhook_kinds().count("model_rejected")
    world.mlflow.stop()
    try:
        attempt = world.cluster.rerun_task("evaluate", "evaluate-mlflow-down")
    finally:
        world.mlflow.start()
    log = attempt.log
    retryable = "ServiceUnavailableError" in log
    decision = next(iter((attempt.directory / "outputs").glob("decision-*")), None)
    decided = decision is not None and decision.exists() and decision.stat().st_size > 0
    rejected = rehearsal.webhook_kinds().count("model_rejected") - rejected_before
    passed = attempt.returncode != 0 and retryable and not decided and rejected == 0
    return Outcome(name, passed, f"evaluate exit {attempt.returncode}, "
                                 f"{'ServiceUnavailableError' if retryable else 'no ServiceUnavailableError'} in its "
                                 f"log; decision written: {decided}; model_rejected alerts: {rejected}"
                                 + ("" if retryable else f"; log tail: {attempt.tail(2)[-300:]}"))


def run_all(world: World, progress=print) -> list[Outcome]:
    """Every guarantee, in the order the issue lists them; a check that raises is a FAILED outcome."""
    rehearsal = Rehearsal(world)
    outcomes: dict[str, Outcome] = {}

    def check(keys: tuple[str, ...], title: str, function) -> None:
        progress(f"[rehearsal] {title} ...")
        started = time.monotonic()
        try:
            result = function(rehearsal)
        except Exception as error:  # noqa: BLE001 (a crashed check is a failed guarantee, with the error)
            failure = f"check crashed: {type(error).__name__}: {str(error)[:300]}"
            result = tuple(Outcome(f"{title} ({key})", False, failure) for key in keys)
        for key, outcome in zip(keys, result if isinstance(result, tuple) else (result,)):
            outcomes[key] = outcome
            progress(f"[rehearsal]   {'passed' if outcome.passed else 'FAILED'} "
                     f"({time.monotonic() - started:.0f}s): {outcome.guarantee}")

    try:
        check(("1",), "training pipeline, one pod per task", training_registers_and_deploys)
        check(("2",), "two serving replicas", replicas_share_feedback)
        check(("6",), "Postgres restart during a serving burst", serving_survives_postgres_restart)
        if rehearsal.replicas:
            problem = send_campaign(rehearsal)
            if problem:
                progress(f"[rehearsal]   campaign traffic: {problem}")
        check(("3a", "4"), "three monitors, the first with the webhook down",
              monitors_start_one_run_and_deliver_spooled_alert)
        check(("3b",), "two monitors at the same moment", racing_monitors_start_one_run)
        check(("5",), "register killed and retried", register_killed_then_retried)
        check(("7",), "evaluate with MLflow down", evaluate_with_mlflow_down)
    finally:
        stop_replicas(rehearsal)
    return [outcomes[key] for key in sorted(outcomes)]
