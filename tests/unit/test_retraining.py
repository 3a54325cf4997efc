"""Retraining triggers: cooldown, de-duplication, failures that leave the ledger unmarked, launchers."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading

import pandas as pd
import pytest

from tests.conftest import make_config
from tuneloop import kubeflow, monitoring, retraining
from tuneloop.errors import PipelineError
from tuneloop.retraining import LaunchedRun, RetrainingError, RetrainingRequest

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


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
    assert sorted(results) == ["cooldown", "cooldown", "cooldown", "started"]


def test_the_same_report_never_starts_two_runs(tmp_path):
    config = make_config(tmp_path, monitoring={"cooldown_hours": 0})
    launcher = FakeLauncher()
    first = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, now=NOW)
    again = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, now=NOW + dt.timedelta(days=2))
    assert (first.status, again.status) == ("started", "duplicate") and again.run_id == first.run_id
    assert len(launcher.requests) == 1


def test_a_busy_ledger_starts_nothing(tmp_path):
    config = make_config(tmp_path)
    launcher = FakeLauncher()
    with retraining._exclusive(retraining.lock_path(config), 1.0) as held:
        assert held
        outcome = retraining.trigger_retraining(config, request(), launcher=launcher, now=NOW, lock_timeout=0.2)
    assert outcome.status == "busy" and launcher.requests == []


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


def test_registry_ledger(tmp_path):
    from mlflow.tracking import MlflowClient

    from tuneloop import registry

    config = make_config(tmp_path, monitoring={"ledger": "registry"})
    registry.client(config).create_registered_model(config.registry.model_name)
    launcher = FakeLauncher()
    first = retraining.trigger_retraining(config, request("drift-a"), launcher=launcher, now=NOW)
    second = retraining.trigger_retraining(config, request("drift-b"), launcher=launcher,
                                           now=NOW + dt.timedelta(hours=1))
    assert (first.status, second.status) == ("started", "cooldown") and len(launcher.requests) == 1
    model = MlflowClient(config.tracking_uri, config.tracking_uri).get_registered_model(config.registry.model_name)
    assert json.loads(model.tags[retraining.LEDGER_TAG])[0]["run_id"] == "run-1"
    assert not (tmp_path / "state" / "monitoring" / retraining.LEDGER_FILE).exists()


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
