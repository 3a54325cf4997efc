"""The Kubeflow Pipelines side: connect, upload, run and schedule through ``kfp.Client``.

Everything here talks to the KFP v2beta1 REST API through the SDK, and every failure leaves as one
:class:`KubeflowError` line (a :class:`~tuneloop.errors.PipelineError`): an unreachable host, refused
credentials (HTTP 401/403), an unknown pipeline. The bearer token never appears in a message.

- Credentials: a bearer token (argument, ``TUNELOOP_KFP_TOKEN`` or ``KF_PIPELINES_TOKEN``) or a token
  file such as a projected service-account token (argument, ``TUNELOOP_KFP_TOKEN_FILE``,
  ``KF_PIPELINES_SA_TOKEN_PATH``, else ``/var/run/secrets/kubeflow/pipelines/token`` when present).
  A token file is re-read on every request, so a kubelet-rotated token keeps working.
- Uploads are idempotent: a version is named ``<pipeline>-<sha256[:12]>`` of the YAML bytes, and
  identical content is found and reused instead of uploaded again.
- A schedule is one recurring run per name that references the pipeline *without* a version, which
  KFP (since kubeflow/pipelines#11560) resolves to the latest version at every trigger.
- Cron (:mod:`tuneloop.cron`): KFP parses six fields with seconds first (``0 0 3 * * 1``). A classic
  five-field expression gets ``0`` prepended; left as five fields, KFP would read the minute as the second.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import kfp
import kfp_server_api
import urllib3
import yaml
from google.protobuf import json_format
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_server_api.exceptions import ApiException

from tuneloop.cron import normalize_cron
from tuneloop.errors import ConfigError, PipelineError

TOKEN_ENVS = ("TUNELOOP_KFP_TOKEN", "KF_PIPELINES_TOKEN")
TOKEN_FILE_ENVS = ("TUNELOOP_KFP_TOKEN_FILE", "KF_PIPELINES_SA_TOKEN_PATH")
DEFAULT_TOKEN_FILE = "/var/run/secrets/kubeflow/pipelines/token"
DEFAULT_EXPERIMENT = "tuneloop"
HEALTH_TIMEOUT = (10, 30)
"""Connect and read timeouts (seconds) of the health check made when connecting."""

SCHEDULE_DESCRIPTION = "Managed by tuneloop: runs the latest version of the pipeline."


class KubeflowError(PipelineError):
    """A Kubeflow Pipelines API call failed. ``status`` is the HTTP status, None when no answer came."""

    def __init__(self, message: str, *, status: int | None = None, **context) -> None:
        super().__init__(message, **context)
        self.status = status


@dataclass(frozen=True)
class UploadResult:
    """An uploaded (or already present) pipeline version. ``created``: this call uploaded it."""

    pipeline_id: str
    version_id: str
    version_name: str
    created: bool


@dataclass(frozen=True)
class ScheduleResult:
    """The recurring run of a schedule. ``created``: no schedule of that name existed before;
    ``updated``: one existed with other settings and was replaced (KFP cannot edit one in place)."""

    recurring_run_id: str
    created: bool
    updated: bool = False


class KubeflowClient(kfp.Client):
    """``kfp.Client`` whose health check is one request with a timeout and a clean error, where the
    SDK's own retries five times, five seconds apart, and logs each failure with a traceback."""

    _health = None

    def _load_config(self, *args, **kwargs) -> kfp_server_api.Configuration:
        """The SDK's configuration, minus instant connect retries: they add nothing (no backoff)
        but a logged warning each before the one clean error."""
        config = super()._load_config(*args, **kwargs)
        config.retries = urllib3.Retry(total=3, connect=0)
        return config

    def get_kfp_healthz(self, sleep_duration: int = 5) -> kfp_server_api.V2beta1GetHealthzResponse:
        """Ask the server's health endpoint once (cached); raise :class:`KubeflowError` on failure."""
        if self._health is None:
            with api_errors(self, "checking the server's health"):
                self._health = self._healthz_api.healthz_service_get_healthz(_request_timeout=HEALTH_TIMEOUT)
        return self._health


# Connecting


def connect(
    host: str,
    *,
    namespace: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
) -> kfp.Client:
    """Connect to the Kubeflow Pipelines API at ``host`` and check that it answers.

    Args:
        host: the API endpoint, e.g. ``http://127.0.0.1:8888`` (``https://`` is assumed without a
            scheme); empty means ``KF_PIPELINES_ENDPOINT``.
        namespace: the user namespace of a multi-user deployment; pipelines, experiments and
            schedules are then private to it. None: the SDK's context setting, or shared.
        token: a bearer token; None means ``TUNELOOP_KFP_TOKEN`` or ``KF_PIPELINES_TOKEN``.
        token_file: a file holding the token (re-read per request), e.g. a projected
            service-account token; None means ``TUNELOOP_KFP_TOKEN_FILE``,
            ``KF_PIPELINES_SA_TOKEN_PATH``, else the in-cluster default path when it exists.

    Raises:
        ConfigError: no host, both a token and a token file, or an unreadable token file.
        KubeflowError: the host is unreachable or refuses the credentials.
    """
    url = _host_url(host or os.environ.get("KF_PIPELINES_ENDPOINT", ""))
    auth = _credentials(token, token_file)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore", FutureWarning)
        client = KubeflowClient(host=url, namespace=namespace or "kubeflow", **auth)
    if namespace:
        client._context_setting["namespace"] = namespace  # the SDK ignores the literal "kubeflow"
    client.get_kfp_healthz()
    return client


def _host_url(host: str) -> str:
    host = host.strip().rstrip("/")
    if not host:
        raise ConfigError("no Kubeflow Pipelines host given (nor KF_PIPELINES_ENDPOINT)", field="host")
    return host if re.match(r"https?://", host) else f"https://{host}"


def _credentials(token: str | None, token_file: str | None) -> dict[str, Any]:
    """The ``kfp.Client`` keyword arguments for the chosen credentials (none: an open API)."""
    if token and token_file:
        raise ConfigError("give a Kubeflow Pipelines token or a token file, not both", field="token")
    if not token and not token_file:
        token = _first_env(TOKEN_ENVS)
        if not token:
            token_file = _first_env(TOKEN_FILE_ENVS) or _existing(DEFAULT_TOKEN_FILE)
    if token:
        return {"existing_token": token.strip()}
    if token_file:
        return {"credentials": _file_credentials(Path(token_file).expanduser())}
    return {}


def _first_env(names: Iterable[str]) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name, "").strip()), None)


def _existing(path: str) -> str | None:
    return path if os.path.isfile(path) else None


def _file_credentials(path: Path) -> ServiceAccountTokenVolumeCredentials:
    try:
        empty = not path.read_text().strip()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        message = f"cannot read the Kubeflow Pipelines token file {path}: {reason}"
        raise ConfigError(message, path=str(path)) from None
    if empty:
        raise ConfigError(f"the Kubeflow Pipelines token file {path} is empty", path=str(path))
    return ServiceAccountTokenVolumeCredentials(str(path))


# Uploading


def upload(client: kfp.Client, pipeline_file: str | Path, *, name: str | None = None) -> UploadResult:
    """Upload a compiled pipeline YAML as a new version of the pipeline ``name``, once per content.

    The pipeline is created when none of that name exists. The version is named
    ``<name>-<sha256[:12]>`` of the file's bytes; when the pipeline already holds it, nothing is
    uploaded and ``created`` is False.

    Args:
        pipeline_file: a YAML compiled by ``kfp`` (``tuneloop compile``).
        name: the pipeline's name; None means the YAML's ``pipelineInfo.name``.

    Raises:
        PipelineError: the file is missing or not a compiled KFP pipeline.
        KubeflowError: the API refused or could not be reached.
    """
    path = Path(pipeline_file)
    content = _read_compiled(path)
    spec_name = _pipeline_name(content, path)  # parse strictly even when a name is given
    name = name or spec_name
    version_name = f"{name}-{hashlib.sha256(content).hexdigest()[:12]}"
    with api_errors(client, f"uploading {path.name}"):
        pipeline_id = _find_pipeline(client, name) or _create_pipeline(client, name)
        existing = _find_version(client, pipeline_id, version_name)
        if existing is not None:
            return UploadResult(pipeline_id, existing.pipeline_version_id, version_name, created=False)
        version_id = _upload_version(client, path, pipeline_id, version_name)
    return UploadResult(pipeline_id, version_id, version_name, created=True)


def _read_compiled(path: Path) -> bytes:
    if path.suffix not in (".yaml", ".yml"):
        raise PipelineError(f"not a compiled pipeline YAML (.yaml or .yml): {path}", path=str(path))
    try:
        return path.read_bytes()
    except OSError as error:
        raise PipelineError(f"cannot read compiled pipeline {path}: {error.strerror}", path=str(path)) from None


def _pipeline_name(content: bytes, path: Path) -> str:
    """``pipelineInfo.name`` of the first YAML document, after a strict parse into ``PipelineSpec``."""
    try:
        spec = next(yaml.safe_load_all(content), None)
        parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    except (yaml.YAMLError, json_format.ParseError, AttributeError, TypeError) as error:
        reason = _first_line(str(error)) or type(error).__name__
        raise PipelineError(f"{path} is not a compiled KFP pipeline: {reason}", path=str(path)) from None
    if not parsed.pipeline_info.name:
        raise PipelineError(f"{path} names no pipeline (pipelineInfo.name is empty)", path=str(path))
    return parsed.pipeline_info.name


def _find_pipeline(client: kfp.Client, name: str) -> str | None:
    """The id of the pipeline called ``name`` in the client's namespace (shared when none)."""
    response = client.list_pipelines(filter=_equals("display_name", name), page_size=2, namespace=_namespace(client))
    matches = [p for p in response.pipelines or [] if name in (p.display_name, p.name)]
    if len(matches) > 1:
        raise KubeflowError(f"{len(matches)} pipelines are named '{name}' on {_host(client)}; delete or rename one")
    return matches[0].pipeline_id if matches else None


def _create_pipeline(client: kfp.Client, name: str) -> str:
    """Create an empty pipeline (its versions come from ``upload_version``); a racing twin wins."""
    body = kfp_server_api.V2beta1Pipeline(
        name=name, display_name=name, description="Uploaded by tuneloop.", namespace=_namespace(client)
    )
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
    except ApiException as error:
        if error.status == 409 and (pipeline_id := _find_pipeline(client, name)):
            return pipeline_id
        raise


def _find_version(client: kfp.Client, pipeline_id: str, version_name: str):
    """The version of ``pipeline_id`` named ``version_name``, or None (pages through all versions)."""
    page_token = ""
    while True:
        response = client.list_pipeline_versions(pipeline_id, page_token=page_token, page_size=100)
        for version in response.pipeline_versions or []:
            if version_name in (version.name, version.display_name):
                return version
        page_token = response.next_page_token
        if not page_token:
            return None


def _upload_version(client: kfp.Client, path: Path, pipeline_id: str, version_name: str) -> str:
    try:
        with _quiet():
            version = client.upload_pipeline_version(
                str(path), version_name, pipeline_id=pipeline_id, description="Uploaded by tuneloop."
            )
    except ApiException as error:
        if error.status == 409 and (twin := _find_version(client, pipeline_id, version_name)):
            return twin.pipeline_version_id
        raise
    return version.pipeline_version_id


# Running and scheduling


def run_latest(
    client: kfp.Client,
    pipeline_name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    params: dict[str, Any] | None = None,
    run_name: str | None = None,
) -> str:
    """Start one run of the newest version of ``pipeline_name`` in ``experiment``; return its run id.

    Raises:
        KubeflowError: no such pipeline (or it has no version), or the API refused.
    """
    with api_errors(client, f"starting a run of '{pipeline_name}'"):
        pipeline_id = _require_pipeline(client, pipeline_name)
        version = _latest_version(client, pipeline_id, pipeline_name)
        experiment_id = _experiment_id(client, experiment)
        with _quiet():
            run = client.run_pipeline(
                experiment_id,
                run_name or f"{pipeline_name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}",
                params=dict(params or {}),
                pipeline_id=pipeline_id,
                version_id=version.pipeline_version_id,
            )
    return run.run_id


def schedule(
    client: kfp.Client,
    pipeline_name: str,
    *,
    cron: str,
    name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params: dict[str, Any] | None = None,
) -> ScheduleResult:
    """Keep exactly one recurring run called ``name`` (in ``experiment``) that runs the latest
    version of the pipeline.

    The recurring run references the pipeline without a version, so each trigger runs whatever
    version is newest then. Called again with the same settings it changes nothing; with other
    settings (cron, parameters) it deletes the old recurring run and creates the new one, because
    the KFP v2beta1 API has no update for recurring runs.

    Args:
        cron: six fields with seconds first, or five classic fields (``0`` seconds is prepended),
            or a descriptor such as ``@daily``.

    Raises:
        ConfigError: the cron expression is invalid.
        KubeflowError: no such pipeline (or it has no version yet), or the API refused.
    """
    cron = normalize_cron(cron)
    with api_errors(client, f"scheduling '{name}'"):
        pipeline_id = _require_pipeline(client, pipeline_name)
        _latest_version(client, pipeline_id, pipeline_name)  # a schedule of nothing would fail at every trigger
        experiment_id = _experiment_id(client, experiment)
        wanted = _recurring_run(name, cron, pipeline_id, experiment_id, dict(params or {}))
        existing = _find_recurring_runs(client, name, experiment_id)
        if len(existing) == 1 and _same_schedule(existing[0], wanted):
            return ScheduleResult(existing[0].recurring_run_id, created=False)
        for old in existing:
            client.delete_recurring_run(old.recurring_run_id)
        created = client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=wanted)
    return ScheduleResult(created.recurring_run_id, created=not existing, updated=bool(existing))


def _require_pipeline(client: kfp.Client, name: str) -> str:
    pipeline_id = _find_pipeline(client, name)
    if pipeline_id is None:
        raise KubeflowError(f"no pipeline named '{name}' on {_host(client)}", status=404)
    return pipeline_id


def _latest_version(client: kfp.Client, pipeline_id: str, name: str):
    response = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    if not response.pipeline_versions:
        raise KubeflowError(f"pipeline '{name}' on {_host(client)} has no versions; upload one first", status=404)
    return response.pipeline_versions[0]


def _experiment_id(client: kfp.Client, experiment: str) -> str:
    """The id of the experiment called ``experiment``, created when missing."""
    with _quiet():
        return client.create_experiment(experiment, namespace=_namespace(client)).experiment_id


def _recurring_run(name: str, cron: str, pipeline_id: str, experiment_id: str, params: dict[str, Any]):
    return kfp_server_api.V2beta1RecurringRun(
        display_name=name,
        description=SCHEDULE_DESCRIPTION,
        experiment_id=experiment_id,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(pipeline_id=pipeline_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=params),
        trigger=kfp_server_api.V2beta1Trigger(cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=cron)),
        mode=kfp_server_api.RecurringRunMode.ENABLE,
        max_concurrency="1",
        no_catchup=True,
    )


def _find_recurring_runs(client: kfp.Client, name: str, experiment_id: str) -> list:
    found, page_token = [], ""
    while True:
        response = client.list_recurring_runs(
            page_token=page_token, page_size=100, experiment_id=experiment_id, filter=_equals("display_name", name)
        )
        found += [r for r in response.recurring_runs or [] if r.display_name == name]
        page_token = response.next_page_token
        if not page_token:
            return found


def _same_schedule(existing, wanted) -> bool:
    """Whether a recurring run already does what ``wanted`` asks (trigger, pipeline, parameters, on)."""

    def key(run) -> tuple:
        reference = run.pipeline_version_reference
        cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
        parameters = (run.runtime_config.parameters if run.runtime_config else None) or {}
        return (
            cron,
            reference.pipeline_id if reference else None,
            (reference.pipeline_version_id if reference else None) or None,
            json.dumps(parameters, sort_keys=True),
            str(run.mode),
            str(run.max_concurrency),
            bool(run.no_catchup),
        )

    return key(existing) == key(wanted)


# Parameters and cron


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["epochs=3", "base_model=bert"]`` into pipeline parameters.

    Each value is read as JSON when it parses (``3``, ``0.5``, ``true``, ``{"a": 1}``), else kept as
    the string it is.

    Raises:
        ConfigError: an item has no ``=``, an empty name, or repeats a name.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"pipeline parameter {item!r} is not of the form name=value", field="params")
        if key in params:
            raise ConfigError(f"pipeline parameter '{key}' is given twice", field="params")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


# Errors


@contextlib.contextmanager
def api_errors(client: kfp.Client, action: str) -> Iterator[None]:
    """Turn what ``kfp``, ``kfp_server_api`` and ``urllib3`` raise into one-line :class:`KubeflowError`
    messages, with the bearer token masked wherever it might appear.

    Args:
        action: what was being done, for the message (``"uploading training.yaml"``).
    """
    try:
        yield
    except KubeflowError as error:
        error.message = _scrub(client, error.message)
        raise
    except ApiException as error:
        raise _http_error(client, error, action) from None
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as error:
        raise _unreachable(client, _reason(error)) from None
    except OSError as error:  # the token file vanished between requests
        message = f"cannot read the Kubeflow Pipelines token: {error.strerror or error}"
        raise KubeflowError(_scrub(client, message)) from None
    except ValueError as error:  # the SDK's own checks, e.g. two experiments of one name
        message = f"Kubeflow Pipelines at {_host(client)}: {_first_line(str(error))}"
        raise KubeflowError(_scrub(client, message)) from None


def _http_error(client: kfp.Client, error: ApiException, action: str) -> KubeflowError:
    status, host = error.status, _host(client)
    if not status:  # kfp_server_api reports TLS failures as status 0
        return _unreachable(client, _first_line(str(error.reason)))
    if status == 401:
        message = (
            f"Kubeflow Pipelines at {host} refused the credentials (HTTP 401): give a token "
            f"({' or '.join(TOKEN_ENVS)}) or a token file ({TOKEN_FILE_ENVS[0]})"
        )
    elif status == 403:
        message = f"Kubeflow Pipelines at {host} denied access (HTTP 403) while {action}{_server_says(error)}"
    elif status == 404:
        message = f"Kubeflow Pipelines at {host} found nothing (HTTP 404) while {action}{_server_says(error)}"
    else:
        message = f"Kubeflow Pipelines at {host} answered HTTP {status} while {action}{_server_says(error)}"
    return KubeflowError(_scrub(client, message), status=status)


def _unreachable(client: kfp.Client, reason: str) -> KubeflowError:
    return KubeflowError(_scrub(client, f"Kubeflow Pipelines at {_host(client)} is unreachable: {reason}"))


def _server_says(error: ApiException) -> str:
    """``": <the server's message>"`` from a JSON error body (gRPC gateway or upload handler)."""
    body = error.body.decode(errors="replace") if isinstance(error.body, bytes) else str(error.body or "")
    try:
        data = json.loads(body)
        text = data.get("message") or data.get("error_message") or data.get("error") or ""
    except (ValueError, AttributeError):
        text = "" if "<" in body else body
    text = _first_line(str(text))
    return f": {text[:300]}" if text else ""


def _reason(error: BaseException) -> str:
    """A short cause of a failed connection: ``connection refused``, ``timed out``..."""
    causes = list(_causes(error))
    for cause in causes:  # the socket's own error is the most precise
        if isinstance(cause, OSError) and cause.errno in errno.errorcode:
            return os.strerror(cause.errno).lower()
    for cause in causes:  # urllib3's NewConnectionError is a ConnectTimeoutError: look at it first
        if isinstance(cause, urllib3.exceptions.NameResolutionError):
            return "the host name does not resolve"
        if isinstance(cause, urllib3.exceptions.NewConnectionError):
            return "cannot connect"
        if isinstance(cause, (urllib3.exceptions.TimeoutError, TimeoutError)):
            return "timed out"
    return _first_line(str(error)) or type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it wraps: urllib3's ``reason``, else the exception chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (current.__cause__ or current.__context__)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _host(client: kfp.Client) -> str:
    return client._existing_config.host


def _secret(client: kfp.Client) -> str | None:
    key = client._existing_config.api_key.get("authorization")
    return key if key and key != "placeholder" else None


def _scrub(client: kfp.Client, text: str) -> str:
    secret = _secret(client)
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def _namespace(client: kfp.Client) -> str | None:
    return client.get_user_namespace() or None


def _equals(key: str, value: str) -> str:
    """A KFP list filter (JSON ``Filter`` message) matching ``key == value``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "string_value": value}]})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the SDK's ``print`` of UI links, so the CLI alone decides what goes to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
