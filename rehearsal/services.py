"""Real services on loopback, for the rehearsal and the integration tests.

Each context manager starts one service on ``127.0.0.1`` and a free port, keeps its data in a
temporary directory, and stops it (and removes the directory) on exit:

    with postgres() as pg, redis() as rd, s3(buckets=["tuneloop"]) as store:
        with mlflow_server(pg.url, "s3://tuneloop/mlflow", s3_env=store.env) as tracking:
            ...

Each yields a handle whose ``url`` (or ``endpoint``) the clients use, and whose ``stop()``/``start()``
take the service down and bring it back on the same port and data, for outage rehearsals.

URLs that carry credentials (Postgres) are meant to be passed to clients only through environment
variables; the handles' ``repr`` never shows them, and nothing here prints them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

def _postgres_bin() -> Path:
    """``$TUNELOOP_POSTGRES_BIN``, else the Debian package's 15, else the newest installed version."""
    if os.environ.get("TUNELOOP_POSTGRES_BIN"):
        return Path(os.environ["TUNELOOP_POSTGRES_BIN"])
    preferred = Path("/usr/lib/postgresql/15/bin")
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if
                       p.parts[-3].isdigit() else 0)
    return preferred if (preferred / "initdb").exists() or not installed else installed[-1].parent


POSTGRES_BIN = _postgres_bin()
"""Where the Debian ``postgresql`` package puts ``initdb``, ``pg_ctl`` and ``postgres``."""

LOOPBACK = "127.0.0.1"
S3_REGION = "us-east-1"
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal-secret"}
"""moto accepts any credentials; these exist so clients sign requests as they would against S3."""


class ServiceStartError(RuntimeError):
    """A service did not come up; the message names it and ends with the tail of its log."""


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((LOOPBACK, port)) == 0


def _wait_until(ready, *, what: str, timeout: float, log: Path | None = None, process=None) -> None:
    """Poll ``ready()`` until it is true; raise ServiceStartError with the log tail on timeout or exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    state = f"exited with {process.returncode}" if process is not None and process.poll() is not None else "timed out"
    raise ServiceStartError(f"{what} did not become ready ({state}){tail}")


def _stop_process(process: subprocess.Popen | None, timeout: float = 15) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def serve_in_thread(server: ThreadingHTTPServer, *, poll_interval: float, name: str) -> threading.Thread:
    """Serve ``server`` (each request in a daemon thread) from a started daemon thread."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), name=name, daemon=True)
    thread.start()
    return thread


def stop_serving(server: ThreadingHTTPServer, thread: threading.Thread) -> None:
    """Stop a server that :func:`serve_in_thread` started and free its port."""
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@contextlib.contextmanager
def _running(service, directory: Path):
    """Start ``service``; on exit stop it and remove its temporary ``directory``."""
    try:
        service.start()
        yield service
    finally:
        service.stop()
        shutil.rmtree(directory, ignore_errors=True)


# PostgreSQL ---------------------------------------------------------------------------------------


def postgres_available() -> str | None:
    """None when Postgres can be started here, else why not."""
    if not (POSTGRES_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {POSTGRES_BIN} (apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start Postgres as the postgres user"
    return None


@dataclass
class Postgres:
    """A running PostgreSQL cluster: ``url`` is a SQLAlchemy URL with credentials (keep it in env)."""

    data_dir: Path
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    _as_postgres: list[str] = field(repr=False, default_factory=list)

    @property
    def url(self) -> str:
        """``postgresql+psycopg2://user:password@127.0.0.1:port/database``."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return self.url.rsplit("/", 1)[0] + f"/{database}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def _pg_ctl(self, *args: str) -> None:
        command = [*self._as_postgres, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), *args]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceStartError(f"pg_ctl {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        options = f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.data_dir.parent} -c fsync=off"
        self._pg_ctl("start", "-w", "-t", "60", "-o", options)
        _wait_until(lambda: _port_open(self.port), what="PostgreSQL", timeout=30, log=self.log)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut, as in a pod restart)."""
        self._pg_ctl("stop", "-w", "-m", "fast")

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop, stay down ``down_seconds``, start again on the same port and data."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def create_database(self, name: str) -> str:
        """Create a database (if missing) and return its URL."""
        import psycopg2

        connection = psycopg2.connect(host=LOOPBACK, port=self.port, user=self.user, password=self.password,
                                      dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url_for(name)


@contextlib.contextmanager
def postgres(database: str = "tuneloop", *, workdir: Path | None = None) -> Iterator[Postgres]:
    """A PostgreSQL 15 server on loopback with password (scram) auth and one database.

    As root the server runs as the ``postgres`` OS user (Postgres refuses root) via ``runuser``, so
    ``workdir`` (default: the system temp dir) must be reachable by that user.
    """
    problem = postgres_available()
    if problem:
        raise ServiceStartError(problem)
    root = Path(tempfile.mkdtemp(prefix="pg-", dir=workdir))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, user="postgres", group="postgres")
    password = secrets.token_hex(16)
    password_file = root / "pwfile"
    password_file.write_text(password + "\n")
    if as_postgres:
        shutil.chown(password_file, user="postgres", group="postgres")
    service = Postgres(data_dir=root / "data", port=free_port(), user="tuneloop", password=password,
                       database=database, _as_postgres=as_postgres)
    initdb = [*as_postgres, str(POSTGRES_BIN / "initdb"), "-D", str(service.data_dir), "-U", service.user,
              f"--pwfile={password_file}", "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
              "--no-sync"]
    result = subprocess.run(initdb, capture_output=True, text=True)
    password_file.unlink()
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise ServiceStartError(f"initdb failed: {result.stderr.strip()[-2000:]}")
    try:
        service.start()
        service.create_database(database)
        yield service
    finally:
        with contextlib.suppress(ServiceStartError):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)


# Redis --------------------------------------------------------------------------------------------


def redis_available() -> str | None:
    """None when ``redis-server`` is on PATH, else why not."""
    return None if shutil.which("redis-server") else "redis-server not found (apt-get install redis-server)"


@dataclass
class Redis:
    """A running Redis server without persistence."""

    port: int
    directory: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:port``."""
        return f"redis://{LOOPBACK}:{self.port}"

    @property
    def connection_string(self) -> str:
        """``127.0.0.1:port``, the form Feast's Redis online store takes."""
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        log = self.directory / "redis.log"
        command = ["redis-server", "--bind", LOOPBACK, "--port", str(self.port), "--save", "", "--appendonly", "no",
                   "--dir", str(self.directory), "--logfile", str(log), "--protected-mode", "yes"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_until(self._pings, what="Redis", timeout=20, log=log, process=self.process)

    def _pings(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        _stop_process(self.process)
        self.process = None


@contextlib.contextmanager
def redis(*, workdir: Path | None = None) -> Iterator[Redis]:
    """A Redis server on loopback (no persistence, no password)."""
    problem = redis_available()
    if problem:
        raise ServiceStartError(problem)
    directory = Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))
    service = Redis(port=free_port(), directory=directory)
    with _running(service, directory):
        yield service


# S3 (moto) ----------------------------------------------------------------------------------------


def s3_available() -> str | None:
    """None when moto's server can run here, else why not."""
    try:
        import moto.server  # noqa: F401
        import boto3  # noqa: F401
    except ImportError as error:
        return f"moto[server] not installed ({error.name}); pip install -e '.[dev]'"
    return None


@dataclass
class S3:
    """A moto S3 server: ``endpoint`` and the ``env`` a client needs to reach it."""

    port: int
    directory: Path
    buckets: list[str]
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, s3fs, pyarrow and MLflow at this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
            **S3_TEST_CREDENTIALS,
        }

    def client(self):
        """A boto3 S3 client for this store."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_REGION,
                            aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> None:
        client = self.client()
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in ``bucket``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for item in page.get("Contents", [])]

    def start(self) -> None:
        log = self.directory / "moto.log"
        command = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        with open(log, "ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=self.directory)
        _wait_until(lambda: _http_ok(f"{self.endpoint}/moto-api/"), what="moto S3 server", timeout=60, log=log,
                    process=self.process)

    def stop(self) -> None:
        _stop_process(self.process)
        self.process = None


@contextlib.contextmanager
def s3(buckets: list[str] | tuple[str, ...] = ("tuneloop",), *, workdir: Path | None = None) -> Iterator[S3]:
    """An S3-compatible store (moto's server, state in memory) with ``buckets`` created."""
    problem = s3_available()
    if problem:
        raise ServiceStartError(problem)
    directory = Path(tempfile.mkdtemp(prefix="s3-", dir=workdir))
    service = S3(port=free_port(), directory=directory, buckets=list(buckets))
    with _running(service, directory):
        for bucket in buckets:
            service.create_bucket(bucket)
        yield service


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


# MLflow tracking server ---------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """An ``mlflow server`` with a SQL backend store and proxied object-store artifacts."""

    port: int
    directory: Path
    backend_url: str = field(repr=False)
    artifacts_destination: str
    env: dict[str, str] = field(repr=False, default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``, the tracking URI clients use."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 120) -> None:
        """Start the server (the backend URL goes through the environment, never argv) and wait for /health."""
        log = self.directory / "mlflow.log"
        environment = {**os.environ, **self.env, "MLFLOW_BACKEND_STORE_URI": self.backend_url,
                       "MLFLOW_ARTIFACTS_DESTINATION": self.artifacts_destination}
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", LOOPBACK, "--port",
                   str(self.port), "--workers", "1", "--serve-artifacts"]
        with open(log, "ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=self.directory,
                                            env=environment, start_new_session=True)
        _wait_until(lambda: _http_ok(f"{self.url}/health"), what="MLflow server", timeout=timeout, log=log,
                    process=self.process)

    def stop(self) -> None:
        """Stop the server and its workers (they share its process group)."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(timeout=5)
        self.process = None
        _wait_until(lambda: not _port_open(self.port), what="MLflow server shutdown", timeout=20)


@contextlib.contextmanager
def mlflow_server(backend_url: str, artifacts_destination: str, *, s3_env: dict[str, str] | None = None,
                  workdir: Path | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on loopback: ``backend_url`` (SQL) stores runs and the registry, and the
    server proxies artifacts (``mlflow-artifacts:/``) to ``artifacts_destination`` (e.g. ``s3://...``),
    reached with ``s3_env`` (the S3 handle's ``env``)."""
    directory = Path(tempfile.mkdtemp(prefix="mlflow-", dir=workdir))
    service = MlflowServer(port=free_port(), directory=directory, backend_url=backend_url,
                           artifacts_destination=artifacts_destination, env=dict(s3_env or {}))
    with _running(service, directory):
        yield service


# webhook receiver ---------------------------------------------------------------------------------


@dataclass
class ReceivedPost:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")


class WebhookReceiver:
    """A tiny HTTP server that records every POST and answers 200; ``stop()``/``start()`` take it
    down and bring it back on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[ReceivedPost] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "WebhookReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append(ReceivedPost(self.path, dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self._thread = serve_in_thread(self._server, poll_interval=0.05, name="webhook-receiver")
        return self

    def stop(self) -> None:
        if self._server is not None:
            stop_serving(self._server, self._thread)
            self._server = None

    def posts(self) -> list[ReceivedPost]:
        with self._lock:
            return list(self.received)

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A running :class:`WebhookReceiver`."""
    with WebhookReceiver() as receiver:
        yield receiver
