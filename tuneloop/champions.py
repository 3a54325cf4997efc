"""What deploys keep in the shared state database: the champion history and per-run deploy outcomes.

The champion history (newest last, at most :data:`HISTORY_LIMIT`) is what rollback walks. It lives
in the state database (:mod:`tuneloop.state_store`), one row per registered model with a revision:
every write is a compare-and-set (``UPDATE ... WHERE revision = :seen``, re-read and retried on a
conflict), so concurrent writers lose no entry. A champion move also holds the champion lock for the
read of the current champion, the history write and the alias moves, so ``champion`` always names
the history's newest entry. The registered model's tag :data:`HISTORY_TAG` mirrors the history for
display (and seeds it, once, for projects that recorded it there before). Read errors propagate:
an unreadable history is an error, never an empty one.

Deploy outcomes are keyed by (registered model, pipeline run, model version): a retried ``deploy``
step reads its own earlier outcome before acting.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from tuneloop import state_store
from tuneloop.errors import RegistryError

if TYPE_CHECKING:
    from tuneloop.config import TuneloopConfig

logger = logging.getLogger("tuneloop.champions")

STAGE = "deployment"
PREVIOUS_CHAMPION = "previous-champion"
HISTORY_TAG = "tuneloop.champion_history"
HISTORY_LIMIT = 50
HISTORY_WRITE_ATTEMPTS = 20


# --------------------------------------------------------------------------------------------
# Champion history


@dataclass
class History:
    """The champion history as read: its versions (oldest first) and the revision they were read at
    (0: no row in the state database yet)."""

    versions: list[str]
    revision: int


def history(config: TuneloopConfig) -> list[str]:
    """The champions of the registered model, oldest first.

    Raises:
        ServiceUnavailableError: the state database is unreachable (never an empty history).
        RegistryError: the history cannot be read.
    """
    return read_history(config).versions


def read_history(config: TuneloopConfig, connection: sa.Connection | None = None) -> History:
    """The history in the state database; before its first write there, the MLflow tag that older
    tuneloop versions kept. Read errors propagate."""
    table = state_store.champion_history
    query = sa.select(table.c.versions, table.c.revision).where(table.c.model_name == config.registry.model_name)
    if connection is None:
        with state_store.transaction(config) as own:
            row = own.execute(query).first()
    else:
        row = connection.execute(query).first()
    if row is not None:
        return History([str(item) for item in json.loads(row.versions)], row.revision)
    return History(_tag_history(config), 0)


def _tag_history(config: TuneloopConfig) -> list[str]:
    from mlflow.exceptions import MlflowException

    from tuneloop import registry

    name = config.registry.model_name
    try:
        tags = registry.client(config).get_registered_model(name).tags or {}
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            return []
        raise
    try:
        recorded = json.loads(tags.get(HISTORY_TAG) or "[]")
    except json.JSONDecodeError as error:
        raise RegistryError(f"the champion history tag {HISTORY_TAG} of {name!r} is not JSON ({error}); fix or "
                            f"delete the tag", stage=STAGE, field=HISTORY_TAG) from error
    if not isinstance(recorded, list):
        raise RegistryError(f"the champion history tag {HISTORY_TAG} of {name!r} is not a JSON list", stage=STAGE,
                            field=HISTORY_TAG)
    return [str(item) for item in recorded if isinstance(item, (str, int))]


def compare_and_set(connection: sa.Connection, config: TuneloopConfig, seen: History, versions: list[str]) -> bool:
    """Write ``versions`` if the history is still at ``seen.revision``; False when another writer was
    first (a concurrent first write fails the transaction with ``IntegrityError`` instead)."""
    table = state_store.champion_history
    values = {"versions": state_store.dumps(versions[-HISTORY_LIMIT:]), "revision": seen.revision + 1,
              "updated_at": dt.datetime.now(dt.UTC).isoformat()}
    if seen.revision == 0:
        connection.execute(table.insert().values(model_name=config.registry.model_name, **values))
        return True
    updated = connection.execute(table.update().where(table.c.model_name == config.registry.model_name,
                                                      table.c.revision == seen.revision).values(**values))
    return updated.rowcount == 1


def update_history(config: TuneloopConfig, change: Callable[[list[str]], list[str] | None], *,
                   lock: bool = False, then: Callable[[list[str]], None] | None = None) -> list[str]:
    """Apply ``change`` to the history by compare-and-set, re-reading and retrying on a conflict.

    Args:
        change: the new history from the current one (None: leave it as it is).
        lock: hold the champion lock for the whole read-change-write (champion moves, so that the
            alias moves in ``then`` happen in the same order as the history's entries).
        then: runs inside the transaction after a successful write (a failure rolls the write back).

    Returns:
        the history as written (or as found, when ``change`` left it alone).

    Raises:
        RegistryError: the history kept changing for :data:`HISTORY_WRITE_ATTEMPTS` tries.
    """
    name = config.registry.model_name
    for _ in range(HISTORY_WRITE_ATTEMPTS):
        try:
            with state_store.transaction(config, lock=f"tuneloop-champion:{name}" if lock else None) as connection:
                seen = read_history(config, connection)
                wanted = change(list(seen.versions))
                if wanted is None:
                    return seen.versions
                wanted = wanted[-HISTORY_LIMIT:]
                if not compare_and_set(connection, config, seen, wanted):
                    continue
                if then is not None:
                    then(wanted)
        except IntegrityError:  # another writer created the row first: read it and try again
            continue
        _mirror_tag(config, wanted)
        return wanted
    raise RegistryError(f"the champion history of {name!r} kept changing under concurrent writers "
                        f"({HISTORY_WRITE_ATTEMPTS} tries); try again", stage=STAGE)


def _mirror_tag(config: TuneloopConfig, versions: list[str]) -> None:
    """Show the history on the registered model (display only: the state database is the record)."""
    from tuneloop import registry

    try:
        registry.client(config).set_registered_model_tag(config.registry.model_name, HISTORY_TAG,
                                                         json.dumps(versions))
    except Exception as error:  # the registry's own errors; the record is already written
        logger.warning("could not mirror the champion history of %s to the tag %s: %s",
                       config.registry.model_name, HISTORY_TAG, error)


def seed_history(config: TuneloopConfig, version: str) -> None:
    """Start the champion history with ``version`` when none is recorded yet (a champion set by
    ``register`` alone), so that a later rollback can return to it."""
    update_history(config, lambda versions: None if versions else [str(version)])


def previous_in(versions: list[str], version: str) -> str | None:
    """The champion before the newest ``version`` entry of ``versions``."""
    earlier = [item for item in versions if item != version]
    if version in versions:
        index = len(versions) - 1 - versions[::-1].index(version)
        earlier = [item for item in versions[:index] if item != version]
    return earlier[-1] if earlier else None


def move_champion(config: TuneloopConfig, version: str, *, rollback: bool = False) -> str | None:
    """Point ``champion`` at ``version``; record the old one as ``previous-champion`` and in the history.

    The read of the current champion, the history write (compare-and-set) and the alias moves happen
    under the champion lock, in one transaction: concurrent moves are serialised and lose no entry.

    Args:
        rollback: cut the history after the newest ``version`` entry (the rolled-back entries go)
            instead of appending to it.

    Returns:
        the version that was champion before (None when there was none).

    Raises:
        RegistryError: the aliases could not be moved (the history is left as it was).
        ServiceUnavailableError: the state database is unreachable.
    """
    from tuneloop import registry

    mlflow = registry.client(config)
    name = config.registry.model_name
    previous: list[str | None] = [None]

    def change(versions: list[str]) -> list[str]:
        previous[0] = registry.alias_version(config, registry.CHAMPION)
        if rollback:
            if version not in versions:
                return [version]
            return versions[: len(versions) - versions[::-1].index(version)]
        if previous[0] and previous[0] != version and (not versions or versions[-1] != previous[0]):
            versions.append(previous[0])
        if not versions or versions[-1] != version:
            versions.append(version)
        return versions

    def move_aliases(versions: list[str]) -> None:
        try:
            mlflow.set_registered_model_alias(name, registry.CHAMPION, version)
            before = previous_in(versions, version)
            if before:
                mlflow.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
            else:
                try:
                    mlflow.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
                except Exception:  # the alias did not exist
                    pass
        except Exception as error:
            raise RegistryError(f"could not move {registry.CHAMPION} of {name!r} to version {version}: {error}",
                                stage=STAGE) from error

    update_history(config, change, lock=True, then=move_aliases)
    logger.info("champion of %s: %s -> %s", name, previous[0], version)
    return previous[0]


def rollback_target(config: TuneloopConfig, champion: str | None,
                    versions: list[str]) -> tuple[str | None, list[str]]:
    """The newest recorded champion other than the current one that still exists, and the history
    cut after it."""
    from tuneloop import registry

    existing = {row["version"] for row in registry.list_versions(config)}
    for index in range(len(versions) - 1, -1, -1):
        candidate = versions[index]
        if candidate != champion and candidate in existing:
            return candidate, versions[: index + 1]
    previous = registry.alias_version(config, PREVIOUS_CHAMPION)
    if previous and previous != champion and previous in existing:
        return previous, [previous]
    return None, versions


# --------------------------------------------------------------------------------------------
# Deploy outcomes per pipeline run


def read_outcome(config: TuneloopConfig, pipeline_run: str, version: str) -> dict | None:
    """The deploy result ``pipeline_run`` recorded for ``version`` (None: it has not finished one).

    Raises:
        ServiceUnavailableError: the state database is unreachable.
    """
    table = state_store.deploy_outcomes
    with state_store.transaction(config) as connection:
        row = connection.execute(sa.select(table.c.result).where(
            table.c.model_name == config.registry.model_name, table.c.pipeline_run == pipeline_run,
            table.c.version == str(version))).first()
    return None if row is None else json.loads(row.result)


def record_outcome(config: TuneloopConfig, pipeline_run: str, version: str, status: str, result: dict) -> None:
    """Record what ``pipeline_run`` did with ``version``; the first record of a run and version stands."""
    table = state_store.deploy_outcomes
    try:
        with state_store.transaction(config) as connection:
            connection.execute(table.insert().values(
                model_name=config.registry.model_name, pipeline_run=pipeline_run, version=str(version),
                status=status, message=str(result.get("message", "")), result=state_store.dumps(result),
                recorded_at=dt.datetime.now(dt.UTC).isoformat()))
    except IntegrityError:  # a concurrent attempt of the same run recorded first: its record stands
        logger.warning("pipeline run %s already recorded its deploy of version %s", pipeline_run, version)
