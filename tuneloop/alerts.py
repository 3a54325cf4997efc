"""Alert sinks: a local JSONL file (always) and a Slack-compatible webhook (when configured).

The webhook URL is a secret: it is read from the environment variable named by
``alerts.webhook_url_env`` and never written to logs, reports, the spool or the config.

Delivery never drops an alert:

- every alert is appended to the JSONL sink (``alerts.jsonl``, default ``<state_dir>/alerts.jsonl``);
- with a webhook configured, the POST is retried with exponential backoff (:class:`RetryPolicy`);
- an alert the webhook still refuses is *spooled*: appended to ``<state_dir>/alerts-spool.jsonl``
  (JSONL, under a file lock) and re-sent, oldest first, by the next :func:`send_alert` or
  :func:`resend_spooled` call (``tuneloop monitor`` calls it first thing). It leaves the spool only
  once delivered. While the webhook is down, a re-send stops at the first failure, so a long spool
  costs one retry sequence, not one per alert.

The alert record's ``webhook`` field says what happened: ``delivered``, ``spooled`` or
``not configured``; ``spooled`` is True when the alert waits in the spool.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tuneloop.config import TuneloopConfig
from tuneloop.errors import TuneloopError

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_SECONDS = 10
WEBHOOK_BACKOFF_SECONDS = 1.0
SPOOL_FILE = "alerts-spool.jsonl"
DELIVERED, SPOOLED, NOT_CONFIGURED = "delivered", "spooled", "not configured"


class AlertError(TuneloopError):
    """An alert could be neither recorded nor spooled (the state directory is not writable)."""

    exit_code = 8


@dataclass(frozen=True)
class RetryPolicy:
    """How a webhook POST is retried: ``attempts`` tries, waiting ``backoff_seconds * factor**n``
    between them (``sleep`` is injectable, so tests need not wait)."""

    attempts: int = WEBHOOK_ATTEMPTS
    backoff_seconds: float = WEBHOOK_BACKOFF_SECONDS
    factor: float = 2.0
    timeout_seconds: float = WEBHOOK_TIMEOUT_SECONDS
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def delays(self) -> list[float]:
        """The waits between attempts (one fewer than ``attempts``)."""
        return [self.backoff_seconds * self.factor**n for n in range(max(self.attempts - 1, 0))]


DEFAULT_RETRY = RetryPolicy()


@dataclass
class SpoolResult:
    """What :func:`resend_spooled` did: alerts delivered now, and alerts still waiting."""

    delivered: int = 0
    remaining: int = 0
    error: str = ""


def send_alert(
    config: TuneloopConfig,
    kind: str,
    message: str,
    details: dict | None = None,
    *,
    retry: RetryPolicy | None = None,
) -> dict:
    """Record an alert in the JSONL sink and post it to the webhook if one is configured.

    Earlier spooled alerts are re-sent first (oldest first). An alert the webhook refuses after
    every retry is spooled for the next call, never dropped.

    Args:
        config: where the sinks are.
        kind: short machine-readable kind (``pipeline_failed``, ``model_rejected``, ``drift_detected``...).
        message: one human-readable line.
        details: extra JSON-serialisable context (run name, model version, report path...).
        retry: the webhook retry policy (default :data:`DEFAULT_RETRY`).

    Returns:
        The alert record, with ``webhook`` set to ``delivered``, ``spooled`` or ``not configured``,
        ``spooled`` (bool) and ``spool_pending`` (alerts waiting in the spool after this call).

    Raises:
        AlertError: the alert could be neither written to the JSONL sink nor spooled.
    """
    retry = retry or DEFAULT_RETRY
    alert = {
        "id": uuid.uuid4().hex,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(),
        "project": config.name,
        "kind": kind,
        "message": message,
        "details": details or {},
    }
    url = webhook_url(config)
    pending = resend_spooled(config, retry=retry) if url else SpoolResult(remaining=spool_size(config))
    if not url:
        alert["webhook"] = NOT_CONFIGURED
    elif pending.remaining:  # the webhook still refuses older alerts: keep the order, queue this one
        alert["webhook"] = SPOOLED
        _spool(config, alert, reason=pending.error or "older alerts are still waiting")
    else:
        error = _post_webhook(url, alert, retry)
        alert["webhook"] = DELIVERED if error is None else SPOOLED
        if error is not None:
            _spool(config, alert, reason=error)
    alert["spooled"] = alert["webhook"] == SPOOLED
    alert["spool_pending"] = spool_size(config)
    _record(config, alert)
    where = f"webhook {alert['webhook']}"
    if alert["spooled"]:
        where += f", {alert['spool_pending']} alert(s) waiting in {spool_path(config)}"
    print(f"alert [{kind}]: {message} (recorded in {config.alerts_path}; {where})", flush=True)
    return alert


def webhook_url(config: TuneloopConfig) -> str:
    """The webhook URL from the environment (empty when not configured). Never log it."""
    return os.environ.get(config.alerts.webhook_url_env, "").strip()


def spool_path(config: TuneloopConfig) -> Path:
    """The spool of undelivered alerts: ``<state_dir>/alerts-spool.jsonl``."""
    return Path(config.state_dir) / SPOOL_FILE


def spool_size(config: TuneloopConfig) -> int:
    """How many alerts wait in the spool."""
    return len(_read_spool(spool_path(config)))


def read_spool(config: TuneloopConfig) -> list[dict]:
    """The alerts waiting in the spool, oldest first."""
    return _read_spool(spool_path(config))


def resend_spooled(config: TuneloopConfig, *, retry: RetryPolicy | None = None) -> SpoolResult:
    """Re-send spooled alerts to the webhook, oldest first; delivered ones leave the spool.

    Stops at the first alert the webhook still refuses (after its retries). Without a configured
    webhook nothing is sent and the spool stays as it is.
    """
    retry = retry or DEFAULT_RETRY
    path = spool_path(config)
    url = webhook_url(config)
    if not path.is_file():
        return SpoolResult()
    with _locked(path):
        waiting = _read_spool(path)
        if not waiting or not url:
            return SpoolResult(remaining=len(waiting))
        delivered, error = 0, ""
        for alert in waiting:
            failure = _post_webhook(url, alert, retry)
            if failure is not None:
                error = failure
                alert["attempts"] = int(alert.get("attempts", 1)) + 1
                alert["last_error"] = failure
                break
            delivered += 1
        remaining = waiting[delivered:]
        _write_spool(path, remaining)
    if delivered:
        print(f"alerts: re-sent {delivered} spooled alert(s) to the webhook", flush=True)
    if remaining:
        print(f"alerts: {len(remaining)} alert(s) still spooled in {path} (webhook: {error})", flush=True)
    return SpoolResult(delivered=delivered, remaining=len(remaining), error=error)


def read_alerts(config: TuneloopConfig) -> list[dict]:
    """Every alert recorded in the JSONL sink, oldest first."""
    path: Path = config.alerts_path
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Delivery


def slack_body(alert: dict) -> dict:
    """The Slack-compatible JSON body: ``text`` for Slack (mrkdwn), the whole record under ``tuneloop``."""
    lines = [f"*tuneloop {alert['project']}* [{alert['kind']}]: {alert['message']}"]
    details = alert.get("details") or {}
    for key in ("model_version", "report", "retraining"):
        value = details.get(key)
        if value:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            lines.append(f"- {key}: {text}")
    return {"text": "\n".join(lines), "tuneloop": _public(alert)}


def _public(alert: dict) -> dict:
    return {key: value for key, value in alert.items() if key not in {"attempts", "last_error", "spooled_at"}}


def _post_webhook(url: str, alert: dict, retry: RetryPolicy) -> str | None:
    """POST the alert, retrying with backoff. None when delivered, else why not (URL scrubbed)."""
    body = json.dumps(slack_body(alert), default=str).encode("utf-8")
    delays = retry.delays()
    reason = "no attempt made"
    for attempt in range(max(retry.attempts, 1)):
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=retry.timeout_seconds) as response:
                status = getattr(response, "status", 200)
                if 200 <= status < 300:
                    return None
                reason = f"HTTP {status}"
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code}"
        except Exception as error:  # URLError, timeouts, a malformed URL: all mean "not delivered"
            reason = _scrub(_reason(error), url)
        if attempt < len(delays):
            retry.sleep(delays[attempt])
    return reason


def _reason(error: BaseException) -> str:
    inner = getattr(error, "reason", None)
    text = str(inner if inner is not None else error) or type(error).__name__
    return text.splitlines()[0][:200]


def _scrub(text: str, url: str) -> str:
    """Remove the URL (and its host/path parts) from an error text: the URL is a secret."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    for secret in (url, parts.netloc, parts.path if len(parts.path) > 1 else ""):
        if secret:
            text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------------
# Files


def _record(config: TuneloopConfig, alert: dict) -> None:
    """Append to the JSONL sink; when that fails, make sure the alert sits in the spool."""
    path = config.alerts_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as sink:
            sink.write(json.dumps(_public(alert), default=str) + "\n")
    except OSError as error:
        reason = f"JSONL sink {path} not writable: {error.strerror or error}"
        if alert.get("webhook") == DELIVERED:  # the webhook has it: not lost
            print(f"alerts: warning: {reason}", flush=True)
        elif not alert.get("spooled"):
            _spool(config, alert, reason=reason)
            alert["spooled"] = True
            alert["spool_pending"] = spool_size(config)


def _spool(config: TuneloopConfig, alert: dict, *, reason: str) -> None:
    path = spool_path(config)
    record = {**_public(alert), "webhook": SPOOLED, "spooled_at": dt.datetime.now(dt.timezone.utc).isoformat(),
              "attempts": 1, "last_error": reason}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            with path.open("a", encoding="utf-8") as spool:
                spool.write(json.dumps(record, default=str) + "\n")
    except OSError as error:
        raise AlertError(
            f"alert {alert['kind']!r} could not be delivered ({reason}) nor spooled to {path}: "
            f"{error.strerror or error}",
            stage="alerts",
            path=str(path),
        ) from error


def _read_spool(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    alerts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            alerts.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash: keep what can be read
            continue
    return alerts


def _write_spool(path: Path, alerts: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(alert, default=str) + "\n" for alert in alerts), encoding="utf-8")
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (POSIX ``flock``; a no-op where it is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
