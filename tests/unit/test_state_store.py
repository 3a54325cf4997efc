"""The shared state database: where it is, its tables, its locks, and what an outage looks like."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import sqlalchemy as sa

from tests.conftest import make_config
from tuneloop import state_store
from tuneloop.errors import ConfigError, ServiceUnavailableError
from tuneloop.state_store import StateBusyError

ENV = "TUNELOOP_TEST_STATE_DB"


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(params=["sqlite", "postgres"])
def any_database(request, tmp_path, monkeypatch):
    """A config on SQLite in its state_dir, and one on the real Postgres of the test services."""
    if request.param == "sqlite":
        return make_config(tmp_path, state={"lock_timeout_s": 0.5})
    monkeypatch.setenv(ENV, request.getfixturevalue("postgres_url"))
    return make_config(tmp_path, state={"database_url_env": ENV, "lock_timeout_s": 0.5})


def test_unset_means_sqlite_in_the_state_dir_with_every_table(tmp_path):
    config = make_config(tmp_path)
    assert state_store.database_url(config) == f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    assert state_store.check(config).startswith("sqlite at sqlite:///")
    tables = set(sa.inspect(state_store.engine(config)).get_table_names())
    assert {"tuneloop_retraining_ledger", "tuneloop_alerts", "tuneloop_champion_history",
            "tuneloop_deploy_outcomes"} <= tables


def test_tables_are_created_idempotently(tmp_path):
    config = make_config(tmp_path)
    with state_store.transaction(config) as connection:
        connection.execute(state_store.champion_history.insert().values(
            model_name="m", revision=1, versions='["1"]', updated_at="now"))
    state_store.reset_engines()  # a new process: creates the tables again, keeps the rows
    with state_store.transaction(config) as connection:
        assert connection.execute(sa.select(state_store.champion_history.c.versions)).scalar_one() == '["1"]'


def test_the_url_comes_from_the_named_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    config = make_config(tmp_path, state={"database_url_env": ENV})
    state_store.check(config)
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "state" / "state.db").exists()


def test_an_unset_environment_variable_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    config = make_config(tmp_path, state={"database_url_env": ENV})
    with pytest.raises(ConfigError, match=f"state.database_url_env: the environment variable {ENV} is not set"):
        state_store.check(config)


def test_unreachable_postgres_at_start_is_one_line_naming_it_without_the_password(tmp_path, monkeypatch,
                                                                                  closed_port):
    monkeypatch.setenv(ENV, f"postgresql://tuneloop:hunter2@127.0.0.1:{closed_port}/state")
    config = make_config(tmp_path, state={"database_url_env": ENV})
    with pytest.raises(ServiceUnavailableError) as caught:
        state_store.check(config)
    error = caught.value
    message = str(error)
    assert "\n" not in message and "hunter2" not in message and "tuneloop:" not in message
    assert message.startswith(f"the shared state database (postgres at postgresql://***@127.0.0.1:{closed_port}/state)"
                              " is unreachable")
    assert (error.service, error.uri, error.exit_code) == (
        "postgres", f"postgresql://***@127.0.0.1:{closed_port}/state", 75)


def test_a_named_lock_excludes_a_second_holder_until_the_timeout(any_database):
    config = any_database
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with state_store.transaction(config, lock="tuneloop-test-lock"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(StateBusyError, match="lock stayed taken"):
            with state_store.transaction(config, lock="tuneloop-test-lock"):
                pass
    finally:
        release.set()
        thread.join()
    with state_store.transaction(config, lock="tuneloop-test-lock"):
        pass  # free again


def test_a_lock_waits_for_the_holder_to_commit(any_database):
    """The second holder sees what the first committed: check-then-write is atomic."""
    config = any_database.model_copy(update={"state": any_database.state.model_copy(update={"lock_timeout_s": 10})})
    name = f"waits-{time.time_ns()}"
    counter = []

    def increment() -> None:
        with state_store.transaction(config, lock="tuneloop-test-counter") as connection:
            table = state_store.champion_history
            seen = connection.execute(sa.select(table.c.revision).where(table.c.model_name == name)).scalar()
            time.sleep(0.05)
            if seen is None:
                connection.execute(table.insert().values(model_name=name, revision=1, versions="[]", updated_at=""))
            else:
                connection.execute(table.update().where(table.c.model_name == name).values(revision=seen + 1))
            counter.append(seen)

    threads = [threading.Thread(target=increment) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with state_store.transaction(config) as connection:
        table = state_store.champion_history
        assert connection.execute(sa.select(table.c.revision).where(table.c.model_name == name)).scalar_one() == 4
    assert sorted(counter, key=lambda v: v or 0) == [None, 1, 2, 3]
