"""The ASGI guard in front of the API: API key, body size, JSON and schema checks, each a clear 4xx."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ValidationError

from tuneloop.serving.schemas import FeedbackRequest, PredictRequest, RequestLimits

API_KEY_HEADER = "X-API-Key"
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
"""Probe and metrics paths, reachable without the API key."""
PREDICT_PATH = "/predict"
FEEDBACK_PATH = "/feedback"


@dataclass(frozen=True)
class RequestPolicy:
    """What the guard enforces: limits, and the API key when one is configured."""

    limits: RequestLimits
    api_key: str | None = None


REQUEST_MODELS: dict[str, type[BaseModel]] = {PREDICT_PATH: PredictRequest, FEEDBACK_PATH: FeedbackRequest}


class RequestGuard:
    """ASGI middleware: API key, body size, JSON and schema of ``/predict`` and ``/feedback`` bodies.

    Args:
        app: the wrapped ASGI app.
        policy: returns the current :class:`RequestPolicy`, or None while the service is not loaded
            (then only probe paths answer; everything else gets 503).
        models: request model of each POST path that the guard validates.
    """

    def __init__(
        self,
        app: Callable,
        policy: Callable[[], RequestPolicy | None],
        models: Mapping[str, type[BaseModel]] | None = None,
    ) -> None:
        self.app = app
        self.policy = policy
        self.models = dict(REQUEST_MODELS if models is None else models)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        policy = self.policy()
        if policy is None:
            await _error(scope, receive, send, 503, "the model is not loaded yet; retry when /readyz answers 200")
            return
        if policy.api_key and not _key_matches(scope, policy.api_key):
            await _error(scope, receive, send, 401, f"missing or wrong {API_KEY_HEADER} header",
                         headers={"WWW-Authenticate": API_KEY_HEADER})
            return
        model = self.models.get(path) if scope.get("method") == "POST" else None
        if model is None:
            await self.app(scope, receive, send)
            return
        await self._validated(scope, receive, send, model, policy.limits)

    async def _validated(self, scope, receive, send, model: type[BaseModel], limits: RequestLimits) -> None:
        headers = _headers(scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type.startswith("multipart/"):
            await _error(scope, receive, send, 415, f"send a JSON body (Content-Type: application/json), not "
                                                    f"{media_type!r}")
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _error(scope, receive, send, 400, f"invalid Content-Length header {declared!r}")
                return
            if int(declared) > limits.max_body_bytes:
                await _error(scope, receive, send, 413, _too_large(int(declared), limits))
                return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limits.max_body_bytes:
                await _error(scope, receive, send, 413, _too_large(len(body), limits))
                return
            more = message.get("more_body", False)
        if not bytes(body).strip():
            await _error(scope, receive, send, 400, f"empty request body: send JSON like {_example(model)}")
            return
        try:
            model.model_validate_json(bytes(body), context={"limits": limits})
        except ValidationError as error:
            status, message = _describe(error, model)
            await _error(scope, receive, send, status, message, detail=_details(error))
            return
        await self.app(_json_scope(scope, len(body)), _replay(bytes(body), receive), send)


def _headers(scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


def _key_matches(scope, expected: str) -> bool:
    given = _headers(scope).get(API_KEY_HEADER.lower(), "")
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _too_large(size: int, limits: RequestLimits) -> str:
    return (f"request body of {size} bytes is larger than the limit of {limits.max_body_bytes} bytes "
            f"(deployment.max_body_bytes)")


def _example(model: type[BaseModel]) -> str:
    if model is FeedbackRequest:
        return '{"request_id": "...", "label": "..."}'
    return '{"texts": ["..."]}'


def _describe(error: ValidationError, model: type[BaseModel]) -> tuple[int, str]:
    problems = error.errors(include_url=False, include_context=False, include_input=False)
    if any(problem["type"] == "json_invalid" for problem in problems):
        return 400, f"request body is not valid JSON ({problems[0]['msg']}); send JSON like {_example(model)}"
    lines = []
    for problem in problems:
        location = ".".join(str(part) for part in problem["loc"]) or "body"
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif problem["type"] == "too_short" and location == "texts":
            message = "the list is empty; send at least one text"
        elif problem["type"] == "model_type":
            message = f"expected a JSON object like {_example(model)}"
        lines.append(f"{location}: {message}")
    return 422, "invalid request: " + "; ".join(lines)


def _details(error: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in problem["loc"]], "type": problem["type"],
         "msg": str(problem["msg"]).removeprefix("Value error, ")}
        for problem in error.errors(include_url=False, include_context=False, include_input=False)
    ]


async def _error(scope, receive, send, status: int, message: str, *, detail: list | None = None,
                 headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    content: dict[str, Any] = {"error": message}
    if detail:
        content["detail"] = detail
    await JSONResponse(content, status_code=status, headers=headers)(scope, receive, send)


def _json_scope(scope, length: int):
    headers = [(key, value) for key, value in scope.get("headers", [])
               if key.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    return {**scope, "headers": headers}


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
