"""The shared state database: the one home of the SQL database every pod reaches.

It holds the operational state that must outlive one pod and be seen by all of them: the retraining
ledger (:mod:`tuneloop.retraining`), the alert log and spool (:mod:`tuneloop.alerts`), per-run deploy
outcomes and the champion history (:mod:`tuneloop.deployment`).

Where it is (``state`` section of the config):

- ``state.database_url_env`` names an environment variable holding a SQLAlchemy URL (a cluster:
  ``postgresql://...`` from a Kubernetes Secret, because it carries credentials);
- unset: SQLite at ``<state_dir>/state.db`` (one machine, zero set-up).

Concurrency control is the database's own: :func:`transaction` opens a transaction and, given a lock
name, serialises it with every other holder of that name across processes and pods
(Postgres: ``pg_advisory_xact_lock``, released at commit or rollback; SQLite: ``BEGIN IMMEDIATE``,
which takes the database's write lock). Waiting longer than ``state.lock_timeout_s`` raises
:class:`StateBusyError`. Row claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` on Postgres
(:func:`for_update`). Tables are created on first use, idempotently.

An unreachable database raises :class:`tuneloop.errors.ServiceUnavailableError` naming the service
and the URL without credentials, so KFP retries the step instead of taking it for a verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from tuneloop.errors import ConfigError, ServiceUnavailableError
from tuneloop.redaction import redact_url

if TYPE_CHECKING:
    from tuneloop.config import TuneloopConfig

STATE_FILE = "state.db"

metadata = sa.MetaData()

retraining_ledger = sa.Table(
    "tuneloop_retraining_ledger", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("project", sa.String(200), nullable=False),
    sa.Column("report_id", sa.String(200), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # launching | started
    sa.Column("report_path", sa.Text, nullable=False, default=""),
    sa.Column("model_version", sa.String(100), nullable=False, default=""),
    sa.Column("mode", sa.String(20), nullable=False, default=""),
    sa.Column("run_id", sa.String(300), nullable=False, default=""),
    sa.Column("run_name", sa.String(300), nullable=False, default=""),
    sa.Column("claimed_at", sa.String(40), nullable=False),
    sa.Column("heartbeat_at", sa.String(40), nullable=False),
    sa.Column("started_at", sa.String(40), nullable=False, default=""),
    sa.Column("owner", sa.String(64), nullable=False, default=""),
    sa.UniqueConstraint("project", "report_id", name="uq_tuneloop_ledger_report"),
)
"""One row per drift report that claimed (``launching``) or started (``started``) a retraining run."""

alert_log = sa.Table(
    "tuneloop_alerts", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.String(64), nullable=False, unique=True),
    sa.Column("project", sa.String(200), nullable=False),
    sa.Column("time", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False, default="{}"),
    sa.Column("webhook", sa.String(20), nullable=False),  # delivered | spooled | not configured
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("claimed_by", sa.String(64), nullable=False, default=""),
    sa.Column("claimed_until", sa.Float, nullable=False, default=0.0),
    sa.Column("delivered_at", sa.String(40), nullable=False, default=""),
    sa.Index("ix_tuneloop_alerts_spool", "project", "webhook", "seq"),
)
"""Every alert (the alert log); rows with ``webhook = 'spooled'`` are the spool."""

champion_history = sa.Table(
    "tuneloop_champion_history", metadata,
    sa.Column("model_name", sa.String(300), primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)
"""The sequence of champions per registered model (JSON list, newest last), written by compare-and-set."""

deploy_outcomes = sa.Table(
    "tuneloop_deploy_outcomes", metadata,
    sa.Column("model_name", sa.String(300), primary_key=True),
    sa.Column("pipeline_run", sa.String(300), primary_key=True),
    sa.Column("version", sa.String(100), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("result", sa.Text, nullable=False, default="{}"),
    sa.Column("recorded_at", sa.String(40), nullable=False),
)
"""What ``deploy`` did for (pipeline run, model version): a KFP retry reads it before acting."""


class StateBusyError(ServiceUnavailableError):
    """A shared lock stayed taken for ``state.lock_timeout_s`` seconds (another holder is working)."""


_engines: dict[str, sa.Engine] = {}
_engines_guard = threading.Lock()


def database_url(config: TuneloopConfig) -> str:
    """The SQLAlchemy URL of the shared state database (never print it: it may carry a password).

    Raises:
        ConfigError: ``state.database_url_env`` names an environment variable that is unset or empty.
    """
    variable = config.state.database_url_env
    if variable:
        url = os.environ.get(variable, "").strip()
        if not url:
            raise ConfigError(f"state.database_url_env: the environment variable {variable} is not set; it must "
                              f"hold the shared state database URL (postgresql://...)", field="state.database_url_env")
        return url
    return f"sqlite:///{Path(config.state_dir).resolve() / STATE_FILE}"


def service_name(url: str) -> str:
    """The service a URL points at, as errors name it (``postgres``, ``sqlite``, ...)."""
    backend = sa.make_url(url).get_backend_name()
    return "postgres" if backend == "postgresql" else backend


def location(config: TuneloopConfig) -> str:
    """Where the state lives, for messages: ``postgres at postgresql://***@host/db`` or the SQLite path."""
    url = database_url(config)
    return f"{service_name(url)} at {redact_url(url)}"


def engine(config: TuneloopConfig) -> sa.Engine:
    """The engine of the shared state database, its tables created (once per process and URL).

    Raises:
        ServiceUnavailableError: the database cannot be reached.
        ConfigError: the URL is malformed or its driver is not installed.
    """
    url = database_url(config)
    with _engines_guard:
        existing = _engines.get(url)
        if existing is not None:
            return existing
        created = _create_engine(url, config.state.lock_timeout_s)
        try:
            with _translated(url), created.begin() as connection:
                _lock(connection, "tuneloop-schema", config.state.lock_timeout_s)
                metadata.create_all(connection, checkfirst=True)
        except BaseException:
            created.dispose()
            raise
        _engines[url] = created
        return created


def _create_engine(url: str, lock_timeout_s: float) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError as error:
        raise ConfigError(f"state database URL {redact_url(url)} is not a SQLAlchemy URL: {error}",
                          field="state.database_url_env") from error
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, lock_timeout_s)
    try:
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=4,
                                connect_args=_connect_args(parsed))
    except (ImportError, sa_exc.NoSuchModuleError) as error:
        raise ConfigError(f"no database driver for {redact_url(url)} ({error}); install tuneloop[cluster]",
                          field="state.database_url_env") from error


def _connect_args(parsed: sa.URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg"):
        return {"connect_timeout": 10}
    return {}


def _sqlite_engine(parsed: sa.URL, lock_timeout_s: float) -> sa.Engine:
    """SQLite with real transactions: the driver's own transaction handling is off and every
    transaction starts with ``BEGIN IMMEDIATE`` (the write lock, so check-then-write is atomic across
    processes). No connection pool: connections are cheap and never cross a fork."""
    if parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    created = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args={"timeout": lock_timeout_s})

    @sa.event.listens_for(created, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @sa.event.listens_for(created, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return created


@contextlib.contextmanager
def transaction(config: TuneloopConfig, *, lock: str | None = None) -> Iterator[sa.Connection]:
    """A transaction on the shared state database; committed when the block ends, rolled back on error.

    Args:
        lock: a name; the transaction then holds the exclusive lock of that name until it ends
            (every other transaction with the same name waits for it).

    Raises:
        StateBusyError: the lock (or SQLite's write lock) stayed taken for ``state.lock_timeout_s``.
        ServiceUnavailableError: the database cannot be reached.
    """
    url = database_url(config)
    target = engine(config)
    with _translated(url), target.begin() as connection:
        if lock is not None:
            _lock(connection, lock, config.state.lock_timeout_s)
        yield connection


def for_update(statement: sa.Select, connection: sa.Connection) -> sa.Select:
    """``statement`` with ``FOR UPDATE SKIP LOCKED`` on Postgres (rows another transaction holds are
    skipped); SQLite needs none, ``BEGIN IMMEDIATE`` already excludes other writers."""
    if connection.dialect.name == "postgresql":
        return statement.with_for_update(skip_locked=True)
    return statement


def _lock(connection: sa.Connection, name: str, timeout_s: float) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})
    # SQLite: BEGIN IMMEDIATE already holds the database's only write lock.


def lock_key(name: str) -> int:
    """The 64-bit advisory lock key of a lock name (stable across processes and hosts)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    """Turn driver errors into tuneloop's: lock timeouts into :class:`StateBusyError`, lost or refused
    connections into :class:`ServiceUnavailableError` (one line, no credentials)."""
    try:
        yield
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as error:
        service, where = service_name(url), redact_url(url)
        reason = _reason(error, url)
        if _is_lock_timeout(error):
            raise StateBusyError(f"the shared state database ({service} at {where}) lock stayed taken: {reason}",
                                 service=service, uri=where) from error
        raise ServiceUnavailableError(f"the shared state database ({service} at {where}) is unreachable: {reason}",
                                      service=service, uri=where) from error


def _is_lock_timeout(error: sa_exc.DBAPIError) -> bool:
    if getattr(error.orig, "pgcode", None) == "55P03":  # lock_not_available
        return True
    return "database is locked" in str(error.orig)


def _reason(error: sa_exc.DBAPIError, url: str) -> str:
    text = str(error.orig if error.orig is not None else error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    password = sa.make_url(url).password
    if password:
        line = line.replace(str(password), "***")
    return line[:300]


def check(config: TuneloopConfig) -> str:
    """Reach the database and create its tables; returns :func:`location` (for start-up checks).

    Raises:
        ServiceUnavailableError: it cannot be reached.
    """
    engine(config)
    return location(config)


def dumps(value: Any) -> str:
    """JSON as the state tables store it."""
    return json.dumps(value, default=str, separators=(",", ":"))


def reset_engines() -> None:
    """Dispose every cached engine (tests; a forked worker)."""
    with _engines_guard:
        for created in _engines.values():
            created.dispose()
        _engines.clear()
