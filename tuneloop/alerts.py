"""Alert sinks: a local JSONL file (always) and a Slack-compatible webhook (when configured).

The webhook URL is a secret: it is read from the environment variable named by
``alerts.webhook_url_env`` and never written to logs, reports or the config.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tuneloop.config import TuneloopConfig

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_SECONDS = 10


def send_alert(config: TuneloopConfig, kind: str, message: str, details: dict | None = None) -> dict:
    """Record an alert in the JSONL sink and post it to the webhook if one is configured.

    Args:
        config: where the sinks are.
        kind: short machine-readable kind (``pipeline_failed``, ``model_rejected``, ...).
        message: one human-readable line.
        details: extra JSON-serialisable context (run name, model version, report path...).

    Returns:
        The alert record, with ``webhook`` set to ``delivered``, ``failed`` or ``not configured``.
    """
    alert = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(),
        "project": config.name,
        "kind": kind,
        "message": message,
        "details": details or {},
    }
    webhook_url = os.environ.get(config.alerts.webhook_url_env, "")
    alert["webhook"] = _post_webhook(webhook_url, alert) if webhook_url else "not configured"
    path = config.alerts_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        sink.write(json.dumps(alert, default=str) + "\n")
    print(f"alert [{kind}]: {message} (recorded in {path}; webhook {alert['webhook']})", flush=True)
    return alert


def _post_webhook(url: str, alert: dict) -> str:
    """POST a Slack-compatible body, retrying with backoff; never logs the URL."""
    body = json.dumps({"text": f"tuneloop {alert['project']}: {alert['message']}", "tuneloop": alert}).encode()
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS):
                return "delivered"
        except (urllib.error.URLError, TimeoutError, OSError):
            if attempt < WEBHOOK_ATTEMPTS:
                time.sleep(2 ** (attempt - 1))
    return "failed"


def read_alerts(config: TuneloopConfig) -> list[dict]:
    """Every alert recorded in the JSONL sink, oldest first."""
    path: Path = config.alerts_path
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
