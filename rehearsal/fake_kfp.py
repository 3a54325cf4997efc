"""A loopback fake of the Kubeflow Pipelines v2beta1 REST API, for the tests of ``tuneloop.kubeflow``
and for the rehearsal (no real Kubeflow runs on one machine).

It serves, on 127.0.0.1 and a free port, the endpoints ``kfp.Client`` 2.17 (through
``kfp_server_api``) calls to check health, upload pipelines and versions, find them, create
experiments, runs and recurring runs, following the API's contract: snake_case JSON (proto field
names), ``filter`` as a JSON ``Filter`` message, ``sort_by`` as ``"<field> [desc]"``, page tokens,
empty lists omitted, gRPC-gateway error bodies (``{"code", "message"}``) and the upload handler's
(``{"error_message", "error_details"}``), 409 on a duplicate name. Uploaded YAML is parsed strictly
into ``PipelineSpec`` (unknown fields are errors) and answered 400 when it does not parse.

Recurring runs that reference a pipeline without a version resolve the latest version when they
fire (kubeflow/pipelines#11560); :meth:`FakeKFP.trigger` plays the scheduler and fires one.

State lives in memory, in plain dicts keyed by id, so tests can count what was created::

    with FakeKFP(require_token="secret") as fake:
        client = kubeflow.connect(fake.url, token="secret")
        ...
        assert len(fake.pipelines) == 1
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from rehearsal.services import serve_in_thread, stop_serving

API = "/apis/v2beta1"
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}
FILTER_OPERATIONS = {1: "EQUALS", 2: "NOT_EQUALS", 9: "IS_SUBSTRING"}


class ApiError(Exception):
    """An error answer: HTTP status and message (``upload`` picks the upload handler's body)."""

    def __init__(self, status: int, message: str, *, upload: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.upload = status, message, upload


class FakeKFP:
    """The fake server and its state.

    Args:
        require_token: answer 401 to every request whose ``Authorization`` is not ``Bearer <it>``.
        status: answer every request with this HTTP error status (e.g. 403, 500).
        echo_auth: put the received ``Authorization`` header into the 401 message, as a careless
            proxy might, to prove that clients mask the token in what they report.
        multi_user: what the health endpoint says about the deployment.
    """

    def __init__(
        self,
        *,
        require_token: str | None = None,
        status: int | None = None,
        echo_auth: bool = False,
        multi_user: bool = False,
    ) -> None:
        self.require_token = require_token
        self.status = status
        self.echo_auth = echo_auth
        self.multi_user = multi_user
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._ticks = itertools.count()
        self._epoch = datetime(2025, 1, 1, tzinfo=timezone.utc)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> "FakeKFP":
        """Start serving in a daemon thread on a free loopback port."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = serve_in_thread(self._server, poll_interval=0.02, name="fake-kfp")
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            stop_serving(self._server, self._thread)
            self._server = None

    def __enter__(self) -> "FakeKFP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # helpers for tests

    def versions_of(self, pipeline_id: str) -> list[dict]:
        """The versions of a pipeline, oldest first."""
        return sorted((v for v in self.versions.values() if v["pipeline_id"] == pipeline_id), key=lambda v: v["created_at"])

    def latest_version(self, pipeline_id: str) -> dict | None:
        """The newest version of a pipeline, as the API server picks it."""
        versions = self.versions_of(pipeline_id)
        return versions[-1] if versions else None

    def trigger(self, recurring_run_id: str) -> dict:
        """Fire a recurring run once, as the ScheduledWorkflow controller does: a run of the pinned
        version, or of the latest version when the reference names none."""
        with self.lock:
            job = self.recurring_runs[recurring_run_id]
            run = self._new_run({**job, "display_name": f"{job['display_name']}-{next(self._ticks)}"})
            run["recurring_run_id"] = recurring_run_id
            return run

    # state changes (called with the lock held)

    def _now(self) -> str:
        """Strictly increasing RFC 3339 timestamps, so "latest" is never a tie."""
        moment = self._epoch + timedelta(milliseconds=next(self._ticks))
        return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _new_pipeline(self, name: str, display_name: str, description: str, namespace: str) -> dict:
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(409, f"pipeline with name {name!r} already exists in namespace {namespace!r}")
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name or name,
            "description": description,
            "namespace": namespace,
            "created_at": self._now(),
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _new_version(self, pipeline_id: str, name: str, display_name: str, description: str, spec: Any) -> dict:
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found", upload=True)
        if any(v["name"] == name for v in self.versions_of(pipeline_id)):
            raise ApiError(409, f"pipeline version with name {name!r} already exists", upload=True)
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name or name,
            "description": description,
            "created_at": self._now(),
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _resolve(self, reference: dict | None) -> dict:
        """The version a ``pipeline_version_reference`` means (its latest when it names none)."""
        reference = reference or {}
        pipeline_id = reference.get("pipeline_id")
        if not pipeline_id or pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id!r} not found")
        version_id = reference.get("pipeline_version_id")
        if not version_id:
            latest = self.latest_version(pipeline_id)
            if latest is None:
                raise ApiError(404, f"pipeline {pipeline_id} has no versions")
            return latest
        version = self.versions.get(version_id)
        if version is None or version["pipeline_id"] != pipeline_id:
            raise ApiError(404, f"pipeline version {version_id} not found in pipeline {pipeline_id}")
        return version

    def _new_run(self, body: dict) -> dict:
        if body.get("pipeline_spec") is None:
            version = self._resolve(body.get("pipeline_version_reference"))
            reference = {"pipeline_id": version["pipeline_id"], "pipeline_version_id": version["pipeline_version_id"]}
        else:
            _strict_spec(body["pipeline_spec"])
            reference = None
        self._require_experiment(body.get("experiment_id"))
        run = {
            "run_id": str(uuid.uuid4()),
            "display_name": body.get("display_name") or "run",
            "experiment_id": body.get("experiment_id"),
            "pipeline_version_reference": reference,
            "runtime_config": body.get("runtime_config") or {},
            "service_account": body.get("service_account") or "",
            "state": "PENDING",
            "storage_state": "AVAILABLE",
            "created_at": self._now(),
        }
        self.runs[run["run_id"]] = run
        return run

    def _require_experiment(self, experiment_id: str | None) -> None:
        if experiment_id and experiment_id not in self.experiments:
            raise ApiError(404, f"experiment {experiment_id} not found")


def _strict_spec(document: Any) -> None:
    """Parse a pipeline spec document strictly; unknown fields and wrong types are a 400."""
    if not isinstance(document, dict):
        raise ApiError(400, "pipeline spec is not a mapping", upload=True)
    try:
        json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    except json_format.ParseError as error:
        raise ApiError(400, f"invalid pipeline spec: {error}", upload=True) from None


def _parse_upload(filename: str, content: bytes) -> Any:
    """The pipeline spec a stored version reports: the first YAML document, wrapped with the
    platform spec when the file has one (as the API server does)."""
    if not filename.endswith((".yaml", ".yml", ".json")):
        raise ApiError(400, f"unexpected pipeline file format: {filename}", upload=True)
    try:
        documents = [d for d in yaml.safe_load_all(content) if d is not None]
    except yaml.YAMLError as error:
        raise ApiError(400, f"invalid YAML: {error}", upload=True) from None
    if not documents:
        raise ApiError(400, "empty pipeline file", upload=True)
    _strict_spec(documents[0])
    if len(documents) == 1:
        return documents[0]
    return {"pipeline_spec": documents[0], "platform_spec": documents[1]}


def _matches(item: dict, filter_json: str | None) -> bool:
    """Whether ``item`` passes a JSON ``Filter`` (EQUALS, NOT_EQUALS, IS_SUBSTRING on strings)."""
    if not filter_json:
        return True
    try:
        predicates = json.loads(filter_json).get("predicates", [])
    except (ValueError, AttributeError):
        raise ApiError(400, f"invalid filter: {filter_json}") from None
    for predicate in predicates:
        operation = predicate.get("operation")
        operation = FILTER_OPERATIONS.get(operation, operation)
        value = predicate.get("string_value", predicate.get("stringValue"))
        key = predicate.get("key")
        if operation not in ("EQUALS", "NOT_EQUALS", "IS_SUBSTRING") or value is None or not key:
            raise ApiError(400, f"filter predicate not supported by the fake: {predicate}")
        if key not in item:
            raise ApiError(400, f"invalid filter key {key!r}")
        actual = str(item.get(key))
        passed = {"EQUALS": actual == value, "NOT_EQUALS": actual != value, "IS_SUBSTRING": value in actual}
        if not passed[operation]:
            return False
    return True


def _page(items: list[dict], query: dict[str, str], field: str) -> dict:
    """Filter, sort and page a listing; empty lists are omitted as proto3 JSON does."""
    items = [item for item in items if _matches(item, query.get("filter"))]
    sort_by = query.get("sort_by", "").split()
    if sort_by:
        key, order = sort_by[0], sort_by[1:]
        if order not in ([], ["asc"], ["desc"]) or (items and key not in items[0]):
            raise ApiError(400, f"invalid sort_by {query['sort_by']!r}")
        items.sort(key=lambda item: str(item.get(key)), reverse=order == ["desc"])
    size = int(query.get("page_size") or 20)
    start = int(query.get("page_token") or 0)
    page = items[start : start + size]
    answer: dict[str, Any] = {"total_size": len(items)}
    if page:
        answer[field] = page
    if start + size < len(items):
        answer["next_page_token"] = str(start + size)
    return answer


def _check_cron(cron: str) -> None:
    """KFP's parser (robfig/cron ``Parse``): six fields with seconds first, or a descriptor."""
    if cron.startswith("@"):
        return
    if len(cron.split()) != 6:
        raise ApiError(400, f"invalid cron schedule {cron!r}: expected 6 fields")


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the fake's endpoints; see ``ROUTES``."""

    protocol_version = "HTTP/1.0"  # one request per connection: a stopped fake is really gone

    @property
    def fake(self) -> FakeKFP:
        return self.server.fake

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.fake.calls.append((method, parts.path))
        try:
            self._authorize()
            for route_method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, parts.path)
                if match and route_method == method:
                    with self.fake.lock:
                        self._reply(200, handler(self, query, body, *match.groups()))
                    return
            raise ApiError(404, f"Not Found: {method} {parts.path}")
        except ApiError as error:
            self._error(error)

    def _authorize(self) -> None:
        received = self.headers.get("Authorization")
        detail = f" (Authorization: {received!r})" if self.fake.echo_auth else ""
        if self.fake.status:
            raise ApiError(self.fake.status, f"the fake answers HTTP {self.fake.status} to every request{detail}")
        expected = self.fake.require_token
        if expected is not None and received != f"Bearer {expected}":
            raise ApiError(401, f"Unauthenticated: a valid bearer token is required{detail}")

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: ApiError) -> None:
        if error.upload:
            payload = {"error_message": error.message, "error_details": error.message}
        else:
            code = GRPC_CODES.get(error.status, 2)
            payload = {"error": error.message, "code": code, "message": error.message, "details": []}
        self._reply(error.status, payload)

    def _json(self, body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "request body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body is not a JSON object")
        return data

    def _uploaded_file(self, body: bytes) -> tuple[str, bytes]:
        """The ``uploadfile`` part of a multipart/form-data body: its file name and bytes."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "Failed to read pipeline from file", upload=True)
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                return part.get_filename() or "", part.get_payload(decode=True)
        raise ApiError(400, "Failed to read pipeline from file", upload=True)

    def _upload(self, query, body) -> tuple[str, Any]:
        """The pipeline name (``name``, else ``display_name``, else the file name without its extension)
        and the parsed spec of an upload."""
        filename, content = self._uploaded_file(body)
        spec = _parse_upload(filename, content)
        return query.get("name") or query.get("display_name") or filename.rsplit(".", 1)[0], spec

    # endpoints: each takes (query, body, *path groups) and returns the JSON answer

    def healthz(self, query, body) -> dict:
        return {"multi_user": self.fake.multi_user, "pipeline_store": "database"}

    def list_pipelines(self, query, body) -> dict:
        namespace = query.get("namespace", "")
        pipelines = [p for p in self.fake.pipelines.values() if p["namespace"] == namespace]
        return _page(pipelines, query, "pipelines")

    def create_pipeline(self, query, body) -> dict:
        data = self._json(body)
        name = data.get("name") or data.get("display_name")
        if not name:
            raise ApiError(400, "name is required")
        return self.fake._new_pipeline(name, data.get("display_name", ""), data.get("description", ""), data.get("namespace") or "")

    def get_pipeline(self, query, body, pipeline_id) -> dict:
        if pipeline_id not in self.fake.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        return self.fake.pipelines[pipeline_id]

    def upload_pipeline(self, query, body) -> dict:
        name, spec = self._upload(query, body)
        try:
            pipeline = self.fake._new_pipeline(name, query.get("display_name", ""), query.get("description", ""), query.get("namespace", ""))
        except ApiError as error:
            raise ApiError(error.status, "Failed to create a pipeline and a pipeline version", upload=True) from None
        self.fake._new_version(pipeline["pipeline_id"], pipeline["name"], pipeline["display_name"], pipeline["description"], spec)
        return pipeline

    def upload_version(self, query, body) -> dict:
        name, spec = self._upload(query, body)
        pipeline_id = query.get("pipelineid")
        if not pipeline_id:
            raise ApiError(400, "Failed to create a pipeline version", upload=True)
        return self.fake._new_version(pipeline_id, name, query.get("display_name", ""), query.get("description", ""), spec)

    def list_versions(self, query, body, pipeline_id) -> dict:
        self.get_pipeline(query, body, pipeline_id)
        return _page(self.fake.versions_of(pipeline_id), query, "pipeline_versions")

    def get_version(self, query, body, pipeline_id, version_id) -> dict:
        return self.fake._resolve({"pipeline_id": pipeline_id, "pipeline_version_id": version_id})

    def list_experiments(self, query, body) -> dict:
        namespace = query.get("namespace", "")
        experiments = [e for e in self.fake.experiments.values() if e["namespace"] == namespace]
        return _page(experiments, query, "experiments")

    def create_experiment(self, query, body) -> dict:
        data = self._json(body)
        name, namespace = data.get("display_name"), data.get("namespace") or ""
        if not name:
            raise ApiError(400, "experiment display_name is required")
        if any(e["display_name"] == name and e["namespace"] == namespace for e in self.fake.experiments.values()):
            raise ApiError(409, f"experiment {name!r} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": data.get("description") or "",
            "namespace": namespace,
            "storage_state": "AVAILABLE",
            "created_at": self.fake._now(),
        }
        self.fake.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def get_experiment(self, query, body, experiment_id) -> dict:
        self.fake._require_experiment(experiment_id)
        return self.fake.experiments[experiment_id]

    def create_run(self, query, body) -> dict:
        return self.fake._new_run(self._json(body))

    def get_run(self, query, body, run_id) -> dict:
        if run_id not in self.fake.runs:
            raise ApiError(404, f"run {run_id} not found")
        return self.fake.runs[run_id]

    def list_runs(self, query, body) -> dict:
        runs = [r for r in self.fake.runs.values() if query.get("experiment_id") in (None, r["experiment_id"])]
        return _page(runs, query, "runs")

    def create_recurring_run(self, query, body) -> dict:
        data = self._json(body)
        cron = ((data.get("trigger") or {}).get("cron_schedule") or {}).get("cron")
        periodic = (data.get("trigger") or {}).get("periodic_schedule")
        if not cron and not periodic:
            raise ApiError(400, "a recurring run needs a cron or periodic trigger")
        if cron:
            _check_cron(cron)
        if data.get("pipeline_spec") is None:
            self.fake._resolve(data.get("pipeline_version_reference"))  # the pipeline must exist
        self.fake._require_experiment(data.get("experiment_id"))
        now = self.fake._now()
        job = {
            **data,
            "recurring_run_id": str(uuid.uuid4()),
            "namespace": data.get("namespace") or "",
            "mode": data.get("mode") or "ENABLE",
            "max_concurrency": str(data.get("max_concurrency") or "1"),
            "status": "ENABLED" if (data.get("mode") or "ENABLE") == "ENABLE" else "DISABLED",
            "created_at": now,
            "updated_at": now,
        }
        self.fake.recurring_runs[job["recurring_run_id"]] = job
        return job

    def list_recurring_runs(self, query, body) -> dict:
        jobs = list(self.fake.recurring_runs.values())
        if query.get("experiment_id"):
            jobs = [j for j in jobs if j.get("experiment_id") == query["experiment_id"]]
        elif "namespace" in query:
            jobs = [j for j in jobs if j["namespace"] == query["namespace"]]
        return _page(jobs, query, "recurringRuns")  # the proto field itself is camelCase

    def get_recurring_run(self, query, body, job_id) -> dict:
        if job_id not in self.fake.recurring_runs:
            raise ApiError(404, f"recurring run {job_id} not found")
        return self.fake.recurring_runs[job_id]

    def delete_recurring_run(self, query, body, job_id) -> dict:
        self.get_recurring_run(query, body, job_id)
        del self.fake.recurring_runs[job_id]
        return {}


ID = r"([0-9a-fA-F-]+)"
ROUTES: list[tuple[str, str, Callable]] = [
    ("GET", f"{API}/healthz", _Handler.healthz),
    ("GET", f"{API}/pipelines", _Handler.list_pipelines),
    ("POST", f"{API}/pipelines", _Handler.create_pipeline),
    ("POST", f"{API}/pipelines/upload", _Handler.upload_pipeline),
    ("POST", f"{API}/pipelines/upload_version", _Handler.upload_version),
    ("GET", f"{API}/pipelines/{ID}", _Handler.get_pipeline),
    ("GET", f"{API}/pipelines/{ID}/versions", _Handler.list_versions),
    ("GET", f"{API}/pipelines/{ID}/versions/{ID}", _Handler.get_version),
    ("GET", f"{API}/experiments", _Handler.list_experiments),
    ("POST", f"{API}/experiments", _Handler.create_experiment),
    ("GET", f"{API}/experiments/{ID}", _Handler.get_experiment),
    ("GET", f"{API}/runs", _Handler.list_runs),
    ("POST", f"{API}/runs", _Handler.create_run),
    ("GET", f"{API}/runs/{ID}", _Handler.get_run),
    ("GET", f"{API}/recurringruns", _Handler.list_recurring_runs),
    ("POST", f"{API}/recurringruns", _Handler.create_recurring_run),
    ("GET", f"{API}/recurringruns/{ID}", _Handler.get_recurring_run),
    ("DELETE", f"{API}/recurringruns/{ID}", _Handler.delete_recurring_run),
]
