"""Smoke tests: send the smoke texts to a served version (or load it here) and check its answers."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from tuneloop.config import TuneloopConfig
from tuneloop.deployment.common import DEFAULT_SMOKE_TEXT, SmokeCheck
from tuneloop.errors import TuneloopError


def smoke_cases(config: TuneloopConfig) -> list[SmokeCheck]:
    """The smoke inputs: ``deployment.smoke_tests``, or one text with no expected label."""
    cases = [SmokeCheck(case.text, case.expected_label) for case in config.deployment.smoke_tests]
    return cases or [SmokeCheck(DEFAULT_SMOKE_TEXT, None)]


def service_url(config: TuneloopConfig) -> str:
    """Where smoke requests go: ``deployment.service_url``, or the in-cluster Service of the Deployment."""
    if config.deployment.service_url:
        return config.deployment.service_url.rstrip("/")
    if config.deployment.target == "kubernetes":
        return f"http://{config.deployment.deployment_name}.{config.deployment.namespace}.svc.cluster.local"
    return f"http://127.0.0.1:{config.deployment.port}"


def smoke_test(
    config: TuneloopConfig,
    version: str,
    *,
    http: Callable[..., tuple[int, Any]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[SmokeCheck]:
    """POST the smoke texts to ``<service_url>/predict`` until ``version`` answers (old pods may still
    drain for a moment) or ``deployment.smoke_timeout_s`` passes; check each expected label."""
    from tuneloop.serving import API_KEY_HEADER

    http = http or _httpx_post
    cases = smoke_cases(config)
    url = f"{service_url(config)}/predict"
    headers = {"Content-Type": "application/json"}
    api_key = os.environ.get(config.deployment.api_key_env)
    if api_key:
        headers[API_KEY_HEADER] = api_key
    deadline = clock() + config.deployment.smoke_timeout_s
    while True:
        error = None
        try:
            status, body = http(url, json={"texts": [case.text for case in cases]}, headers=headers,
                                timeout=config.deployment.smoke_timeout_s)
        except Exception as exc:  # connection refused, timeouts: retried until the deadline
            status, body, error = None, None, f"{type(exc).__name__}: {exc}"
        if status == 200 and isinstance(body, list) and len(body) == len(cases):
            versions = {str(item.get("model_version")) for item in body if isinstance(item, dict)}
            if versions == {str(version)}:
                return [_check(case, item) for case, item in zip(cases, body)]
            error = f"answered by model version(s) {sorted(versions)}, not {version}"
        elif error is None:
            error = f"HTTP {status}: {str(body)[:300]}"
        if clock() >= deadline:
            return [SmokeCheck(case.text, case.expected_label, error=error) for case in cases]
        sleep(min(config.deployment.poll_interval_s, 1.0))


def _check(case: SmokeCheck, item: dict) -> SmokeCheck:
    label, version = item.get("label"), item.get("model_version")
    probabilities = item.get("probabilities") or {}
    total = sum(probabilities.values()) if probabilities else 0.0
    error = None
    if abs(total - 1.0) > 1e-3:
        error = f"probabilities sum to {total:.4f}, not 1"
    passed = error is None and (case.expected_label is None or label == case.expected_label)
    return SmokeCheck(case.text, case.expected_label, label=label, model_version=str(version), passed=passed,
                      error=error)


def local_smoke_test(config: TuneloopConfig, version: str) -> list[SmokeCheck]:
    """Load ``version`` in this process the way the server does and check the smoke cases on it."""
    from tuneloop import serving

    cases = smoke_cases(config)
    try:
        resolved, directory = serving.fetch_model(config, version)
        model = serving.load_model(directory, resolved)
        probabilities = model.classifier.predict_proba([case.text for case in cases])
    except TuneloopError as error:
        return [SmokeCheck(case.text, case.expected_label, error=error.message) for case in cases]
    labels = model.labels
    checks = []
    for case, row in zip(cases, probabilities.tolist()):
        item = {"label": labels[max(range(len(row)), key=row.__getitem__)], "model_version": resolved,
                "probabilities": dict(zip(labels, row))}
        checks.append(_check(case, item))
    return checks


def _httpx_post(url: str, *, json: Any, headers: dict[str, str], timeout: float) -> tuple[int, Any]:
    import httpx

    response = httpx.post(url, json=json, headers=headers, timeout=timeout)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body
