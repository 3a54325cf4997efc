"""Alert delivery: the alert log in the state database, Slack-compatible webhook with retries (Retry-After,
no retry on 4xx), the shared spool of undelivered alerts, delivered exactly once by racing senders."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from tests.conftest import make_config
from tuneloop import alerts, monitoring

SECRET_PATH = "/services/T000/B000/s3cr3t-token"


class Hook:
    """A local webhook that records what it receives and answers ``status``."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(hook.status)
                for name, value in hook.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def dead_url() -> str:
    """A URL on which nothing listens (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{SECRET_PATH}"


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def retry():
    return alerts.RetryPolicy(attempts=3, backoff_seconds=0.5, factor=2.0, timeout_seconds=2, sleep=Sleeps())


def test_without_a_webhook_the_alert_is_recorded_in_the_state_database(tmp_path, monkeypatch, capsys):
    config = make_config(tmp_path)
    monkeypatch.delenv("TUNELOOP_WEBHOOK_URL", raising=False)
    alert = alerts.send_alert(config, "pipeline_failed", "run x failed", {"run": "x"})
    assert alert["webhook"] == "not configured" and alert["spooled"] is False
    assert [(a["kind"], a["webhook"]) for a in alerts.read_alerts(config)] == [("pipeline_failed", "not configured")]
    assert alerts.read_spool(config) == []
    assert "alert [pipeline_failed]" in capsys.readouterr().out
    # the local world also keeps the JSONL file for people to read
    assert [json.loads(line)["kind"] for line in config.alerts_path.read_text().splitlines()] == ["pipeline_failed"]


def test_delivered_alert_is_slack_compatible(tmp_path, monkeypatch, hook, retry):
    config = make_config(tmp_path)
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    alert = alerts.send_alert(config, "drift_detected", "drift on v3", {"model_version": "3", "report": "/r.html"},
                              retry=retry)
    assert alert["webhook"] == "delivered" and not alert["spooled"]
    (body,) = hook.bodies
    assert "drift on v3" in body["text"] and "model_version: 3" in body["text"] and "/r.html" in body["text"]
    assert body["tuneloop"]["details"]["model_version"] == "3"
    assert retry.sleep == []


def test_unreachable_webhook_is_retried_spooled_and_sent_on_the_next_run(tmp_path, monkeypatch, dead_url, hook, retry,
                                                                         capsys):
    config = make_config(tmp_path)
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    first = alerts.send_alert(config, "drift_detected", "first", {"n": 1}, retry=retry)
    assert first["webhook"] == "spooled" and first["spooled"] is True and first["spool_pending"] == 1
    assert retry.sleep == [0.5, 1.0], "3 attempts, exponential backoff between them"
    assert [a["message"] for a in alerts.read_spool(config)] == ["first"]
    assert alerts.read_alerts(config)[0]["webhook"] == "spooled"  # never dropped: recorded and spooled

    second = alerts.send_alert(config, "drift_detected", "second", retry=retry)
    assert second["spooled"] and [a["message"] for a in alerts.read_spool(config)] == ["first", "second"]

    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    third = alerts.send_alert(config, "drift_detected", "third", retry=retry)
    assert third["webhook"] == "delivered" and third["spool_pending"] == 0
    assert [body["tuneloop"]["message"] for body in hook.bodies] == ["first", "second", "third"]
    assert alerts.read_spool(config) == []

    # the webhook URL is a secret: it appears in no output and no file
    written = capsys.readouterr().out + config.alerts_path.read_text() + json.dumps(alerts.read_alerts(config))
    assert SECRET_PATH not in written and "s3cr3t" not in written


def test_webhook_errors_are_retried_then_spooled(tmp_path, monkeypatch, hook, retry):
    config = make_config(tmp_path)
    hook.status = 500
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    alert = alerts.send_alert(config, "drift_detected", "boom", retry=retry)
    assert alert["spooled"] and len(hook.bodies) == 3
    assert alerts.read_spool(config)[0]["last_error"] == "HTTP 500"
    hook.status = 200
    result = alerts.resend_spooled(config, retry=retry)
    assert (result.delivered, result.remaining) == (1, 0)


def test_resend_stops_at_the_first_failure(tmp_path, monkeypatch, dead_url, retry):
    config = make_config(tmp_path)
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    for n in range(3):
        alerts.send_alert(config, "drift_detected", f"alert {n}", retry=retry)
    retry.sleep.clear()
    result = alerts.resend_spooled(config, retry=retry)
    assert (result.delivered, result.remaining) == (0, 3)
    assert retry.sleep == [0.5, 1.0], "one retry sequence, not one per spooled alert"
    # every send re-tried the oldest alert first (and queued the new one behind it without a try)
    assert [a["attempts"] for a in alerts.read_spool(config)] == [4, 0, 0]


def test_a_4xx_is_not_retried_and_the_alert_stays_spooled(tmp_path, monkeypatch, hook, retry):
    config = make_config(tmp_path)
    hook.status = 404
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    alert = alerts.send_alert(config, "drift_detected", "gone", retry=retry)
    assert alert["spooled"] and len(hook.bodies) == 1 and retry.sleep == []
    assert alerts.read_spool(config)[0]["last_error"] == "HTTP 404"


def test_retry_after_is_honoured(tmp_path, monkeypatch, hook, retry):
    config = make_config(tmp_path)
    hook.status, hook.headers = 429, {"Retry-After": "7"}
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    alert = alerts.send_alert(config, "drift_detected", "slow down", retry=retry)
    assert alert["spooled"] and len(hook.bodies) == 3
    assert retry.sleep == [7.0, 7.0], "Retry-After (7 s) beats the backoff (0.5 s, 1 s)"


def test_spool_is_shared_a_monitor_from_another_directory_delivers_it(tmp_path, monkeypatch, dead_url, hook, retry):
    """Two pods: separate state_dirs (scratch), one shared state database."""
    database = tmp_path / "shared" / "state.db"
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", f"sqlite:///{database}")
    shared = {"state": {"database_url_env": "TUNELOOP_TEST_STATE_DB"}}
    pod_a, pod_b = make_config(tmp_path / "a", **shared), make_config(tmp_path / "b", **shared)
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    assert alerts.send_alert(pod_a, "drift_detected", "from pod a", retry=retry)["spooled"]
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    result = alerts.resend_spooled(pod_b, retry=retry)
    assert (result.delivered, result.remaining) == (1, 0)
    assert [body["tuneloop"]["message"] for body in hook.bodies] == ["from pod a"]
    assert alerts.read_spool(pod_a) == [] and alerts.read_alerts(pod_a)[0]["webhook"] == "delivered"


def test_racing_senders_deliver_each_spooled_alert_exactly_once(tmp_path, monkeypatch, dead_url, hook, retry,
                                                               postgres_url):
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", postgres_url)
    config = make_config(tmp_path, name=f"spool-{uuid.uuid4().hex[:8]}",
                         state={"database_url_env": "TUNELOOP_TEST_STATE_DB"})
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    for n in range(6):
        alerts.send_alert(config, "drift_detected", f"alert {n}", retry=retry)
    assert alerts.spool_size(config) == 6
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    barrier = threading.Barrier(4)
    results = []

    def sender() -> None:
        barrier.wait()
        results.append(alerts.resend_spooled(config, retry=retry).delivered)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = [body["tuneloop"]["message"] for body in hook.bodies]
    assert sorted(messages) == [f"alert {n}" for n in range(6)], "each alert sent exactly once"
    assert sum(results) == 6 and alerts.spool_size(config) == 0


def test_an_unreachable_state_database_is_a_retryable_error_naming_it(tmp_path, monkeypatch, dead_url, retry):
    from tuneloop.errors import ServiceUnavailableError

    port = dead_url.split(":")[2].split("/")[0]
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", f"postgresql://tuneloop:pa55word@127.0.0.1:{port}/state")
    config = make_config(tmp_path, state={"database_url_env": "TUNELOOP_TEST_STATE_DB"})
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    with pytest.raises(ServiceUnavailableError, match="postgres") as caught:
        alerts.send_alert(config, "drift_detected", "x", retry=retry)
    assert "pa55word" not in str(caught.value) and caught.value.exit_code == 75


def test_malformed_webhook_url_is_spooled_and_never_logged(tmp_path, monkeypatch, retry, capsys):
    config = make_config(tmp_path)
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", "notaurl-s3cr3t")
    alert = alerts.send_alert(config, "drift_detected", "x", retry=retry)
    assert alert["spooled"]
    stored = json.dumps(alerts.read_alerts(config))
    assert "s3cr3t" not in stored and "s3cr3t" not in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Through `tuneloop monitor`: the exit code says an alert is spooled


@pytest.fixture
def drifting(tmp_path):
    """A config and a prediction log that drifts from the reference (campaign spam with URLs)."""
    from tests.unit.test_monitoring import NOW, traffic, write_log

    config = make_config(tmp_path, monitoring={"min_rows": 100, "trigger": "none"})
    write_log(config, traffic(300, seed=2, campaign=0.6))
    return config, traffic(800, seed=1), NOW


def test_monitor_exit_code_says_the_alert_was_spooled_and_the_next_run_sends_it(drifting, monkeypatch, dead_url, hook,
                                                                                 retry, capsys):
    config, reference, now = drifting
    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", dead_url)
    first = monitoring.monitor(config, "24h", reference=reference, model_version="1", now=now, retry=retry)
    assert first.verdict == monitoring.DRIFT and first.exit_code == monitoring.EXIT_ALERT_SPOOLED == 12
    assert first.alert["spooled"] and first.spool_pending == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "verdict: drift detected"
    assert json.loads(first.report.json_path.read_text())["alert"]["spooled"] is True
    spooled = alerts.read_spool(config)[0]
    assert "has_url" in spooled["message"] and "version 1" in spooled["message"]
    assert spooled["details"]["report"] == str(first.report.html_path)

    monkeypatch.setenv("TUNELOOP_WEBHOOK_URL", hook.url)
    later = now + pd.Timedelta(days=3)  # nothing in the window any more
    second = monitoring.monitor(config, "24h", reference=reference, model_version="1", now=later, retry=retry)
    assert second.verdict == monitoring.INSUFFICIENT_DATA and second.exit_code == 11
    assert [body["tuneloop"]["kind"] for body in hook.bodies] == ["drift_detected"]
    assert alerts.read_spool(config) == []


def test_monitor_with_an_unreachable_state_database_fails_with_one_line_and_no_password(drifting, monkeypatch,
                                                                                       dead_url, capsys):
    from tuneloop.errors import ServiceUnavailableError

    config, reference, now = drifting
    port = dead_url.split(":")[2].split("/")[0]
    monkeypatch.setenv("TUNELOOP_TEST_STATE_DB", f"postgresql://tuneloop:pa55word@127.0.0.1:{port}/state")
    monkeypatch.delenv("TUNELOOP_WEBHOOK_URL", raising=False)
    config = config.model_copy(update={"state": config.state.model_copy(
        update={"database_url_env": "TUNELOOP_TEST_STATE_DB"})})
    with pytest.raises(ServiceUnavailableError) as caught:
        monitoring.monitor(config, "24h", reference=reference, model_version="1", now=now)
    line = f"error: {caught.value}"  # what `tuneloop monitor` prints before exiting 75
    assert "\n" not in line and "pa55word" not in line + capsys.readouterr().out
    assert f"postgres at postgresql://***@127.0.0.1:{port}/state" in line and caught.value.exit_code == 75
