"""Alerts: recorded in the shared state database, posted to a Slack-compatible webhook when one is
configured, spooled until delivered.

The webhook URL is a secret: it is read from the environment variable named by
``alerts.webhook_url_env`` and never written to logs, reports, the database or the config.

Delivery never drops an alert, whichever pod sends it:

- every alert is first recorded in the alert log, a table of the shared state database
  (:mod:`tuneloop.state_store`: SQLite in ``state_dir`` on one machine, Postgres in a cluster). In
  the local world it is also appended to ``alerts.jsonl`` (``alerts.jsonl``, default
  ``<state_dir>/alerts.jsonl``), an extra file for people, not the record;
- with a webhook configured, the alert waits in the *spool* (its row says ``spooled``) until a
  sender delivers it. Senders deliver the spool oldest first: each claims one row at a time in a
  short transaction (``SELECT ... FOR UPDATE SKIP LOCKED`` on Postgres, under the spool lock) and
  holds the claim for a lease while it posts, so two monitors on two pods never send one alert
  twice. A POST is retried with exponential backoff (``tenacity``; a ``Retry-After`` header is
  honoured, a 4xx other than 429 is not retried). An alert the webhook still refuses stays spooled
  and is re-sent by the next :func:`send_alert` or :func:`resend_spooled` call from any pod
  (``tuneloop monitor`` calls it every run). While the webhook is down a sender stops at the first
  failure, so a long spool costs one retry sequence, not one per alert.

The alert record's ``webhook`` field says what happened: ``delivered``, ``spooled`` or
``not configured``; ``spooled`` is True when the alert waits in the spool.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
import tenacity

from tuneloop import state_store
from tuneloop.config import TuneloopConfig
from tuneloop.errors import ServiceUnavailableError
from tuneloop.state_store import alert_log

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_SECONDS = 10
WEBHOOK_BACKOFF_SECONDS = 1.0
RETRY_AFTER_CAP_SECONDS = 60.0
"""A ``Retry-After`` longer than this is cut to it (the monitor run must end)."""
DELIVERED, SPOOLED, NOT_CONFIGURED = "delivered", "spooled", "not configured"


@dataclass(frozen=True)
class RetryPolicy:
    """How a webhook POST is retried: ``attempts`` tries, waiting ``backoff_seconds * factor**n``
    between them, or longer when the webhook answers with ``Retry-After`` (at most
    :data:`RETRY_AFTER_CAP_SECONDS`); ``sleep`` is injectable, so tests need not wait."""

    attempts: int = WEBHOOK_ATTEMPTS
    backoff_seconds: float = WEBHOOK_BACKOFF_SECONDS
    factor: float = 2.0
    timeout_seconds: float = WEBHOOK_TIMEOUT_SECONDS
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def delays(self) -> list[float]:
        """The waits between attempts without ``Retry-After`` (one fewer than ``attempts``)."""
        return [self.backoff_seconds * self.factor**n for n in range(max(self.attempts - 1, 0))]

    def lease_seconds(self) -> float:
        """How long one alert's delivery may take at worst: the claim on it lasts that long."""
        waits = sum(max(delay, RETRY_AFTER_CAP_SECONDS) for delay in self.delays())
        return self.attempts * self.timeout_seconds + waits + 30.0


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
    """Record an alert in the alert log and deliver it to the webhook if one is configured.

    Earlier spooled alerts are delivered first (oldest first). An alert the webhook refuses after
    every retry stays spooled for the next call, from this pod or any other.

    Args:
        config: where the state database is, and the webhook's environment variable.
        kind: short machine-readable kind (``pipeline_failed``, ``model_rejected``, ``drift_detected``...).
        message: one human-readable line.
        details: extra JSON-serialisable context (run name, model version, report path...).
        retry: the webhook retry policy (default :data:`DEFAULT_RETRY`).

    Returns:
        The alert record, with ``webhook`` set to ``delivered``, ``spooled`` or ``not configured``,
        ``spooled`` (bool) and ``spool_pending`` (alerts waiting in the spool after this call).

    Raises:
        ServiceUnavailableError: the state database is unreachable and the webhook did not take the
            alert either (retry the step).
    """
    retry = retry or DEFAULT_RETRY
    alert = {
        "id": uuid.uuid4().hex,
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "project": config.name,
        "kind": kind,
        "message": message,
        "details": details or {},
    }
    url = webhook_url(config)
    alert["webhook"] = SPOOLED if url else NOT_CONFIGURED
    try:
        _insert(config, alert)
    except ServiceUnavailableError as outage:
        return _deliver_unrecorded(config, alert, url, retry, outage)
    if url:
        resend_spooled(config, retry=retry)
        alert["webhook"] = _state_of(config, alert["id"])
    alert["spooled"] = alert["webhook"] == SPOOLED
    alert["spool_pending"] = spool_size(config)
    _append_jsonl(config, alert)
    where = f"webhook {alert['webhook']}"
    if alert["spooled"]:
        where += f", {alert['spool_pending']} alert(s) waiting in the spool"
    print(f"alert [{kind}]: {message} (recorded in {state_store.location(config)}; {where})", flush=True)
    return alert


def webhook_url(config: TuneloopConfig) -> str:
    """The webhook URL from the environment (empty when not configured). Never log it."""
    return os.environ.get(config.alerts.webhook_url_env, "").strip()


def spool_location(config: TuneloopConfig) -> str:
    """Where undelivered alerts wait, for messages: the alert table of the state database."""
    return f"the alert spool ({alert_log.name} in {state_store.location(config)})"


spool_path = spool_location
"""The former name of :func:`spool_location` (the spool is no longer a file)."""


def spool_size(config: TuneloopConfig) -> int:
    """How many alerts of this project wait in the spool."""
    with state_store.transaction(config) as connection:
        return connection.execute(
            sa.select(sa.func.count()).select_from(alert_log).where(*_spooled(config))).scalar_one()


def read_spool(config: TuneloopConfig) -> list[dict]:
    """The alerts waiting in the spool, oldest first."""
    return _read(config, *_spooled(config))


def read_alerts(config: TuneloopConfig) -> list[dict]:
    """Every alert of this project in the alert log, oldest first."""
    return _read(config, alert_log.c.project == config.name)


def resend_spooled(config: TuneloopConfig, *, retry: RetryPolicy | None = None) -> SpoolResult:
    """Deliver spooled alerts to the webhook, oldest first, each claimed so no other sender posts it too.

    Stops at the first alert the webhook still refuses (after its retries). Without a configured
    webhook nothing is sent and the spool stays as it is.
    """
    retry = retry or DEFAULT_RETRY
    url = webhook_url(config)
    if not url:
        return SpoolResult(remaining=spool_size(config))
    sender = uuid.uuid4().hex
    delivered, error = 0, ""
    while (alert := _claim_next(config, sender, retry.lease_seconds())) is not None:
        failure = _post_webhook(url, alert, retry)
        _settle(config, alert, failure)
        if failure is not None:
            error = failure
            break
        delivered += 1
    remaining = spool_size(config)
    if delivered:
        print(f"alerts: re-sent {delivered} spooled alert(s) to the webhook", flush=True)
    if remaining:
        print(f"alerts: {remaining} alert(s) still spooled in {spool_location(config)}"
              + (f" (webhook: {error})" if error else ""), flush=True)
    return SpoolResult(delivered=delivered, remaining=remaining, error=error)


# --------------------------------------------------------------------------------------------
# The alert log and the spool


def _spooled(config: TuneloopConfig) -> tuple:
    return alert_log.c.project == config.name, alert_log.c.webhook == SPOOLED


def _insert(config: TuneloopConfig, alert: dict) -> None:
    with state_store.transaction(config) as connection:
        connection.execute(alert_log.insert().values(
            alert_id=alert["id"], project=alert["project"], time=alert["time"], kind=alert["kind"],
            message=alert["message"], details=state_store.dumps(alert["details"]), webhook=alert["webhook"],
            attempts=0, last_error="", claimed_by="", claimed_until=0.0, delivered_at=""))


def _read(config: TuneloopConfig, *conditions) -> list[dict]:
    with state_store.transaction(config) as connection:
        rows = connection.execute(sa.select(alert_log).where(*conditions).order_by(alert_log.c.seq)).mappings().all()
    return [_record(row) for row in rows]


def _record(row) -> dict:
    return {"id": row["alert_id"], "time": row["time"], "project": row["project"], "kind": row["kind"],
            "message": row["message"], "details": json.loads(row["details"] or "{}"), "webhook": row["webhook"],
            "attempts": row["attempts"], "last_error": row["last_error"], "delivered_at": row["delivered_at"]}


def _state_of(config: TuneloopConfig, alert_id: str) -> str:
    with state_store.transaction(config) as connection:
        return connection.execute(sa.select(alert_log.c.webhook).where(alert_log.c.alert_id == alert_id)).scalar_one()


def _claim_next(config: TuneloopConfig, sender: str, lease_seconds: float) -> dict | None:
    """Claim the oldest spooled alert nobody else holds, for ``lease_seconds``; None when there is none."""
    now = time.time()
    with state_store.transaction(config, lock=f"tuneloop-alert-spool:{config.name}") as connection:
        query = (sa.select(alert_log).where(*_spooled(config), alert_log.c.claimed_until < now)
                 .order_by(alert_log.c.seq).limit(1))
        row = connection.execute(state_store.for_update(query, connection)).mappings().first()
        if row is None:
            return None
        connection.execute(alert_log.update().where(alert_log.c.seq == row["seq"])
                           .values(claimed_by=sender, claimed_until=now + lease_seconds))
    return _record(row)


def _settle(config: TuneloopConfig, alert: dict, failure: str | None) -> None:
    """Record a delivery (the row leaves the spool) or a failed try (it stays, unclaimed)."""
    values: dict = {"attempts": alert_log.c.attempts + 1, "claimed_by": "", "claimed_until": 0.0}
    if failure is None:
        values.update(webhook=DELIVERED, delivered_at=dt.datetime.now(dt.UTC).isoformat(), last_error="")
    else:
        values.update(last_error=failure)
    with state_store.transaction(config) as connection:
        connection.execute(alert_log.update().where(alert_log.c.alert_id == alert["id"]).values(**values))


def _deliver_unrecorded(config, alert: dict, url: str, retry: RetryPolicy, outage: ServiceUnavailableError) -> dict:
    """The state database is down: post straight to the webhook so the alert is not lost; if that
    fails too, raise the outage (the step is retried)."""
    failure = _post_webhook(url, alert, retry) if url else "no webhook configured"
    if failure is not None:
        raise ServiceUnavailableError(
            f"alert {alert['kind']!r} could not be recorded ({outage.message}) nor delivered ({failure})",
            service=outage.service, uri=outage.uri, stage="alerts",
        ) from outage
    alert.update(webhook=DELIVERED, spooled=False, spool_pending=0)
    print(f"alert [{alert['kind']}]: {alert['message']} (webhook delivered; NOT recorded: {outage.message})",
          flush=True)
    return alert


def _append_jsonl(config: TuneloopConfig, alert: dict) -> None:
    """The extra local file sink (local world only; the database is the record)."""
    if config.world != "local":
        return
    path = config.alerts_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as sink:
            sink.write(json.dumps(_public(alert), default=str) + "\n")
    except OSError as error:
        print(f"alerts: warning: the JSONL file {path} is not writable ({error.strerror or error}); the alert "
              f"is recorded in the state database", flush=True)


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
    hidden = {"attempts", "last_error", "delivered_at", "spool_pending"}
    return {key: value for key, value in alert.items() if key not in hidden}


class WebhookRefused(Exception):
    """The webhook answered with a non-2xx status (``retry_after``: its ``Retry-After``, in seconds)."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


def _post_webhook(url: str, alert: dict, retry: RetryPolicy) -> str | None:
    """POST the alert with retries. None when delivered, else why not (URL scrubbed)."""
    body = json.dumps(slack_body(alert), default=str).encode("utf-8")

    def post() -> None:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=retry.timeout_seconds) as response:
                status = getattr(response, "status", 200)
        except urllib.error.HTTPError as error:
            raise WebhookRefused(error.code, _retry_after(error.headers)) from None
        if not 200 <= status < 300:
            raise WebhookRefused(status)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(retry.attempts, 1)),
        wait=_wait_for(retry),
        retry=tenacity.retry_if_exception(_worth_retrying),
        sleep=retry.sleep,
        reraise=True,
    )
    try:
        retrying(post)
    except WebhookRefused as error:
        return str(error)
    except Exception as error:  # URLError, timeouts, a malformed URL: all mean "not delivered"
        return _scrub(_reason(error), url)
    return None


def _worth_retrying(error: BaseException) -> bool:
    """Server errors, 429 and network failures are retried; other 4xx and a malformed URL are not."""
    if isinstance(error, WebhookRefused):
        return error.status == 429 or error.status >= 500
    return not isinstance(error, ValueError)


def _wait_for(retry: RetryPolicy):
    def wait(state: tenacity.RetryCallState) -> float:
        backoff = retry.backoff_seconds * retry.factor ** (state.attempt_number - 1)
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return max(backoff, min(retry_after, RETRY_AFTER_CAP_SECONDS))
        return backoff

    return wait


def _retry_after(headers) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date."""
    value = (headers or {}).get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return max((moment - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


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
