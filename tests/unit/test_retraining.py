"""Retraining triggers: cooldown, de-duplication, failures that leave the ledger unmarked, launchers."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
import uuid

import pandas as pd
import pytest

from tests.conftest import make_config
from tuneloop import kubeflow, monitoring, retraining
from tuneloop.errors import PipelineError
from tuneloop.retraining import LaunchedRun, RetrainingError, RetrainingRequest

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


class FakeLauncher:
    """Counts the runs it starts; ``fail`` makes the next launches raise."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.requests: list[RetrainingRequest] = []
        self.fail = fail

    def __call__(self, config, request: RetrainingRequest) -> LaunchedRun:
        if self.fail is not None:
            raise self.fail
        self.requests.append(request)
        return LaunchedRun(run_id=f"run-{len(self.requests)}", run_name=request.run_name, mode="fake")


def request(report_id: str = "drift-1") -> RetrainingRequest:
    return RetrainingRequest(report_id=report_id, report_path=f"/reports/{report_id}.json", model_version="3")


@pytest.fixture
def dead_host() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_runs_within_the_cooldown_start_exactly_one_run(tmp_path):
    config = make_config(tmp_path, monitoring={"cooldown_hours": 24})
    launcher = FakeLauncher()
    outcomes = [retraining.trigger_retraining(config, request(f"drift-{n}"), launcher=launcher,
                                              now=NOW + dt.timedelta(hours=n)) for n in range(3)]
    assert [o.status for o in outcomes] == ["started", "cooldown", "cooldown"]
    assert len(launcher.requests) == 1 and all(o.run_id == "run-1" for o in outcomes)
    assert outcomes[1].cooldown_until == (NOW + dt.timedelta(hours=24)).isoformat()
    (entry,) = retraining.read_ledger(config)
    assert entry["report_id"] == "drift-0" and entry["run_id"] == "run-1"
    after = retraining.trigger_retraining(config, request("drift-9"), launcher=launcher,
                                          now=NOW + dt.timedelta(hours=25))
    assert after.status == "started" and after.run_id == "run-2"


def test_concurrent_monitors_start_exactly_one_run(tmp_path):
    config = make_config(tmp_path)
    launcher = FakeLauncher()
    results: list[str] = []
    barrier = threading.Barrier(4)

    def one(n: int) -> None:
        barrier.wait()
        results.append(retraining.trigger_retraining(config, request(f"drift-{n}"), launcher=launcher, now=NOW).status)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(launcher.requests) == 1
    assert results.count("started") == 1 and set(results) <= {"started", "busy", "cooldown"}, results


def test_the_same_report_never_starts_two_runs(tmp_path):
    config = make_config(tmp_path, monitoring={"cooldown_hours": 0})
    launcher = FakeLauncher()
    first = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, now=NOW)
    again = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, now=NOW + dt.timedelta(days=2))
    assert (first.status, again.status) == ("started", "duplicate") and again.run_id == first.run_id
    assert len(launcher.requests) == 1


def test_a_live_claim_of_another_monitor_starts_nothing(tmp_path):
    config = make_config(tmp_path)
    ledger = retraining.Ledger(config)
    claim = ledger.claim(request("drift-other"), now=NOW, cooldown=dt.timedelta(hours=24), find_run=None)
    assert claim.outcome is None and claim.claim_id is not None
    launcher = FakeLauncher()
    outcome = retraining.trigger_retraining(config, request("drift-mine"), launcher=launcher, now=NOW)
    assert outcome.status == "busy" and "drift-other" in outcome.message and launcher.requests == []


def test_a_held_ledger_lock_is_busy_after_the_lock_timeout(tmp_path):
    from tuneloop import state_store

    config = make_config(tmp_path, state={"lock_timeout_s": 0.3})
    launcher = FakeLauncher()
    with state_store.transaction(config, lock=retraining.Ledger(config).lock):
        outcome = retraining.trigger_retraining(config, request(), launcher=launcher, now=NOW)
    assert outcome.status == "busy" and "lock" in outcome.message and launcher.requests == []


def test_a_stale_claim_whose_run_exists_is_recorded_not_launched_again(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    retraining.Ledger(config).claim(request("drift-a"), now=NOW, cooldown=dt.timedelta(hours=24), find_run=None)
    monkeypatch.setattr(retraining, "CLAIM_LEASE_SECONDS", 0.0)  # its monitor died mid-launch
    looked_up = []

    def find_run(cfg, run_name):
        looked_up.append(run_name)
        return "kfp-run-7"

    launcher = FakeLauncher()
    retried = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, find_run=find_run, now=NOW)
    assert looked_up == ["tuneloop-retrain-drift-a"] and launcher.requests == []
    assert retried.status == "duplicate" and retried.run_id == "kfp-run-7"
    (entry,) = retraining.read_ledger(config)
    assert (entry["status"], entry["run_id"]) == ("started", "kfp-run-7")


def test_a_stale_claim_without_a_run_is_dropped_and_the_next_monitor_starts_one(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    retraining.Ledger(config).claim(request("drift-a"), now=NOW, cooldown=dt.timedelta(hours=24), find_run=None)
    monkeypatch.setattr(retraining, "CLAIM_LEASE_SECONDS", 0.0)
    launcher = FakeLauncher()
    outcome = retraining.trigger_retraining(config, request("drift-b"), launcher=launcher,
                                            find_run=lambda cfg, name: None, now=NOW)
    assert outcome.status == "started" and [r.report_id for r in launcher.requests] == ["drift-b"]
    assert [e["report_id"] for e in retraining.read_ledger(config)] == ["drift-b"]


def test_trigger_none_only_alerts(tmp_path):
    config = make_config(tmp_path, monitoring={"trigger": "none"})
    outcome = retraining.trigger_retraining(config, request(), now=NOW)
    assert outcome.status == "disabled" and retraining.read_ledger(config) == []


def test_failing_cluster_trigger_raises_and_leaves_the_ledger_unmarked(tmp_path, dead_host):
    config = make_config(tmp_path, monitoring={"trigger": "kubeflow", "kubeflow_host": dead_host})
    with pytest.raises(RetrainingError, match="could not start the retraining run for drift report drift-1") as caught:
        retraining.trigger_retraining(config, request("drift-1"), now=NOW)
    assert "unreachable" in str(caught.value) and caught.value.exit_code == PipelineError.exit_code
    assert retraining.read_ledger(config) == []
    launcher = FakeLauncher()  # the cluster is back: the next run retries, the cooldown did not start
    retry = retraining.trigger_retraining(config, request("drift-2"), launcher=launcher, now=NOW)
    assert retry.status == "started" and len(launcher.requests) == 1


def test_kubeflow_launcher_runs_the_latest_version_named_after_the_report(tmp_path, monkeypatch):
    config = make_config(tmp_path, monitoring={"trigger": "kubeflow", "kubeflow_host": "http://kfp:8888",
                                               "kubeflow_namespace": "team", "training_pipeline_name": "train-me"})
    calls = {}
    monkeypatch.setattr(kubeflow, "connect", lambda host, namespace=None: calls.update(host=host, ns=namespace) or "c")

    def run_latest(client, pipeline, *, experiment, run_name, params=None):
        calls.update(client=client, pipeline=pipeline, experiment=experiment, run_name=run_name)
        return "kfp-run-42"

    monkeypatch.setattr(kubeflow, "run_latest", run_latest)
    outcome = retraining.trigger_retraining(config, request("drift-20250301T120000Z-abc123"), now=NOW)
    assert outcome.status == "started" and outcome.run_id == "kfp-run-42" and outcome.mode == "kubeflow"
    assert calls == {"host": "http://kfp:8888", "ns": "team", "client": "c", "pipeline": "train-me",
                     "experiment": "tuneloop", "run_name": "tuneloop-retrain-drift-20250301T120000Z-abc123"}
    assert retraining.read_ledger(config)[0]["run_name"] == "tuneloop-retrain-drift-20250301T120000Z-abc123"


def test_kubeflow_run_lookup_by_name_finds_the_interrupted_trigger(tmp_path, monkeypatch):
    from types import SimpleNamespace

    config = make_config(tmp_path, monitoring={"trigger": "kubeflow", "kubeflow_host": "http://kfp:8888"})
    filters = []

    class Client:
        def list_runs(self, page_size, filter):
            filters.append(json.loads(filter))
            return SimpleNamespace(runs=[SimpleNamespace(display_name="tuneloop-retrain-drift-a", run_id="kfp-9")])

    monkeypatch.setattr(kubeflow, "connect", lambda host, namespace=None: Client())
    retraining.Ledger(config).claim(request("drift-a"), now=NOW, cooldown=dt.timedelta(hours=24), find_run=None)
    monkeypatch.setattr(retraining, "CLAIM_LEASE_SECONDS", 0.0)
    monkeypatch.setattr(kubeflow, "run_latest", lambda *a, **k: pytest.fail("must not start a second run"))
    outcome = retraining.trigger_retraining(config, request("drift-b"), now=NOW + dt.timedelta(hours=1))
    assert outcome.status == "cooldown" and outcome.run_id == "kfp-9"
    assert filters[0]["predicates"][0] == {"operation": "EQUALS", "key": "display_name",
                                           "string_value": "tuneloop-retrain-drift-a"}


def test_local_launcher_runs_the_training_pipeline_and_records_the_report(tmp_path, monkeypatch):
    from tuneloop import orchestration

    config = make_config(tmp_path, monitoring={"trigger": "local"})
    seen = {}

    def run_local(cfg, pipeline_file):
        seen["pipeline"] = pipeline_file
        root = tmp_path / "pipeline_root" / "training-run-1"
        root.mkdir(parents=True)
        return orchestration.LocalRun("training-run-1", root, 1.0)

    monkeypatch.setattr(orchestration, "run_local", run_local)
    outcome = retraining.trigger_retraining(config, request("drift-x"), now=NOW)
    assert outcome.status == "started" and outcome.run_id == "training-run-1"
    assert seen["pipeline"].name == "training.py" and seen["pipeline"].parent.name == "pipelines"
    record = json.loads((tmp_path / "pipeline_root" / "training-run-1" / retraining.TRIGGER_RECORD).read_text())
    assert record["report_id"] == "drift-x"


def test_missing_training_pipeline_file_is_an_error(tmp_path):
    config = make_config(tmp_path, monitoring={"training_pipeline_file": "nowhere/training.py"})
    with pytest.raises(RetrainingError, match="training pipeline file not found"):
        retraining.trigger_retraining(config, request(), now=NOW)
    assert retraining.read_ledger(config) == []


def test_the_ledger_is_per_project(tmp_path):
    launcher = FakeLauncher()
    first = make_config(tmp_path, name="first")
    second = make_config(tmp_path, name="second")
    assert retraining.trigger_retraining(first, request("drift-a"), launcher=launcher, now=NOW).status == "started"
    assert retraining.trigger_retraining(second, request("drift-a"), launcher=launcher, now=NOW).status == "started"
    assert len(launcher.requests) == 2


def test_ledger_registry_is_refused_with_the_field_named(tmp_path):
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match="monitoring.ledger"):
        make_config(tmp_path, monitoring={"ledger": "registry"})


# --------------------------------------------------------------------------------------------
# Racing monitors in separate processes, against SQLite and against a real Postgres

RACERS = 4


class CountingLauncher:
    """Appends one line per run it starts to a file every process shares (O_APPEND), slowly enough
    that the racers overlap."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, config, request: RetrainingRequest) -> LaunchedRun:
        with open(self.path, "a", encoding="utf-8") as launches:
            launches.write(request.report_id + "\n")
        time.sleep(0.3)
        return LaunchedRun(run_id=f"run-{request.report_id}", run_name=request.run_name, mode="fake")


def _race_one(config_json: str, report_id: str, launches: str, barrier, results) -> None:
    from tuneloop.config import TuneloopConfig

    config = TuneloopConfig.from_json(config_json)
    barrier.wait()
    try:
        outcome = retraining.trigger_retraining(config, request(report_id), launcher=CountingLauncher(launches),
                                                now=NOW)
        results.put(outcome.status)
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put(f"error: {error}")


def race_monitors(config, launches_path) -> list[str]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_race_one, args=(config.to_json(), f"drift-{n}", str(launches_path), barrier,
                                                      results)) for n in range(RACERS)]
    for racer in racers:
        racer.start()
    statuses = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
    return sorted(statuses)


def test_monitors_racing_in_separate_processes_start_one_run_sqlite(tmp_path):
    config = make_config(tmp_path)
    statuses = race_monitors(config, tmp_path / "launches.txt")
    launched = (tmp_path / "launches.txt").read_text().split()
    assert len(launched) == 1, statuses
    assert statuses.count("started") == 1 and set(statuses) <= {"started", "busy", "cooldown"}, statuses
    assert [e["report_id"] for e in retraining.read_ledger(config)] == launched


def test_monitors_racing_in_separate_processes_start_one_run_postgres(tmp_path, postgres_url, monkeypatch):
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", postgres_url)
    config = make_config(tmp_path, name=f"race-{uuid.uuid4().hex[:8]}", state={"database_url_env": "TUNELOOP_TEST_STATE_DB"})
    statuses = race_monitors(config, tmp_path / "launches.txt")
    launched = (tmp_path / "launches.txt").read_text().split()
    assert len(launched) == 1, statuses
    assert statuses.count("started") == 1 and set(statuses) <= {"started", "busy", "cooldown"}, statuses
    (entry,) = retraining.read_ledger(config)
    assert entry["report_id"] == launched[0] and entry["status"] == "started"
    again = retraining.trigger_retraining(config, request(launched[0]), launcher=CountingLauncher(
        str(tmp_path / "launches.txt")), now=NOW)
    assert again.status == "duplicate" and len((tmp_path / "launches.txt").read_text().split()) == 1


# --------------------------------------------------------------------------------------------
# Through `tuneloop monitor`


@pytest.fixture
def drifting(tmp_path):
    from tests.unit.test_monitoring import NOW as LOG_TIME
    from tests.unit.test_monitoring import traffic, write_log

    config = make_config(tmp_path, monitoring={"min_rows": 100, "cooldown_hours": 24})
    write_log(config, traffic(300, seed=2, campaign=0.6), when=LOG_TIME)
    return config, traffic(800, seed=1), LOG_TIME.to_pydatetime()


def test_three_monitor_runs_within_the_cooldown_start_one_retraining_run(drifting, monkeypatch, capsys):
    config, reference, now = drifting
    monkeypatch.delenv("TUNELOOP_WEBHOOK_URL", raising=False)
    launcher = FakeLauncher()
    outcomes = [monitoring.monitor(config, "24h", reference=reference, model_version="1", launcher=launcher,
                                   now=now + dt.timedelta(minutes=10 * n)) for n in range(3)]
    assert [o.verdict for o in outcomes] == ["drift"] * 3 and [o.exit_code for o in outcomes] == [10] * 3
    assert len(launcher.requests) == 1
    assert [o.trigger.status for o in outcomes] == ["started", "cooldown", "cooldown"]
    started = outcomes[0]
    assert launcher.requests[0].report_id == started.report.report_id
    assert launcher.requests[0].run_name == f"tuneloop-retrain-{started.report.report_id}"
    saved = json.loads(started.report.json_path.read_text())
    assert saved["retraining"]["status"] == "started" and saved["retraining"]["run_id"] == "run-1"
    assert "run run-1" in started.alert["message"]
    (entry,) = retraining.read_ledger(config)
    assert entry["report_id"] == started.report.report_id and entry["report_path"] == str(started.report.json_path)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "verdict: drift detected"


def test_monitor_with_a_failing_trigger_exits_with_the_error_and_retries_next_time(drifting, monkeypatch, capsys):
    config, reference, now = drifting
    monkeypatch.delenv("TUNELOOP_WEBHOOK_URL", raising=False)
    failing = FakeLauncher(fail=kubeflow.KubeflowError("Kubeflow Pipelines at http://kfp is unreachable: refused"))
    outcome = monitoring.monitor(config, "24h", reference=reference, model_version="1", launcher=failing, now=now)
    assert outcome.exit_code == PipelineError.exit_code and isinstance(outcome.error, RetrainingError)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "verdict: drift detected"
    assert "error: [retraining] could not start the retraining run" in captured.err
    assert retraining.read_ledger(config) == []
    assert json.loads(outcome.report.json_path.read_text())["retraining"]["status"] == "failed"
    assert "FAILED to start" in outcome.alert["message"], "the alert still goes out, and says so"

    launcher = FakeLauncher()
    later = monitoring.monitor(config, "24h", reference=reference, model_version="1", launcher=launcher,
                               now=now + dt.timedelta(minutes=30))
    assert later.exit_code == 10 and later.trigger.status == "started" and len(launcher.requests) == 1


def test_no_drift_starts_nothing(tmp_path, monkeypatch):
    from tests.unit.test_monitoring import NOW as LOG_TIME
    from tests.unit.test_monitoring import traffic, write_log

    config = make_config(tmp_path, monitoring={"min_rows": 100})
    write_log(config, traffic(300, seed=2), when=LOG_TIME)
    launcher = FakeLauncher()
    outcome = monitoring.monitor(config, "24h", reference=traffic(800, seed=1), model_version="1", launcher=launcher,
                                 now=pd.Timestamp(LOG_TIME).to_pydatetime())
    assert outcome.exit_code == 0 and launcher.requests == [] and retraining.read_ledger(config) == []
