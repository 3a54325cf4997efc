"""The Feast store of a config: where its registry and online store live, set-up and read-only use.

Two worlds:

- local (the default): a file registry and a SQLite online store under ``<state_dir>/feast``; a run
  applies the definitions itself (zero set-up) and says so in its log.
- cluster: a SQL registry (Postgres, URL in the env var named by ``features.registry_url_env``), a
  Redis online store (``features.redis_connection_env``) and sources on object storage. Only
  :func:`apply` (``tuneloop features apply``, a set-up step) writes the registry; pipeline runs call
  :func:`open_store`, which checks that the registry holds exactly the config's definitions and
  fails with one line naming the set-up command otherwise.

Connection strings hold credentials, so they come only from the environment and every message
names a service by its URI with the credentials removed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import is_connection_error
from tuneloop.errors import ConfigError, ServiceUnavailableError, TuneloopError
from tuneloop.features.definitions import (
    STAGE,
    FeatureDefinitions,
    build_definitions,
    normalised_texts,
    offline_location,
    prepare_texts,
    prepared_fingerprint,
    prepared_texts_uri,
    quiet_feast,
)
from tuneloop.redaction import redact_url

CONNECT_TIMEOUT_S = 5
APPLY_HINT = "run `tuneloop features apply --config <this project's tuneloop.yaml>` (a set-up step) first"


def feast_dir(config: TuneloopConfig) -> Path:
    """Where the local registry and SQLite online store live (in a cluster: per-pod scratch)."""
    return Path(config.state_dir) / "feast"


def applies_on_read(config: TuneloopConfig) -> bool:
    """Whether reading applies the definitions first: only a local world with its file registry."""
    return config.world == "local" and not config.features.registry_url_env


def redact(connection: str) -> str:
    """A connection string or URL without credentials: a URL as :func:`tuneloop.redaction.redact_url`
    writes it (``scheme://***@host:port/path``), Feast's Redis form ``host:port,password=...,ssl=true``
    with only its ``host:port`` nodes.
    """
    if "://" not in connection:
        return ",".join(part for part in connection.split(",") if "=" not in part)
    return redact_url(connection)


def _secret_from_env(variable: str, field_name: str) -> str:
    """A connection string read from the environment (it holds credentials, so never from config)."""
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(f"{field_name}: environment variable {variable} is not set", field=field_name)
    return value


def registry_url(config: TuneloopConfig) -> str | None:
    """The SQL registry URL from ``$<features.registry_url_env>``, or None for a file registry."""
    variable = config.features.registry_url_env
    return _secret_from_env(variable, "features.registry_url_env") if variable else None


def redis_connection(config: TuneloopConfig) -> str | None:
    """The Redis connection string from ``$<features.redis_connection_env>`` in Feast's form
    (``host:port,password=...,ssl=true``; a ``redis://`` or ``rediss://`` URL is converted), or None
    for SQLite."""
    variable = config.features.redis_connection_env
    value = _secret_from_env(variable, "features.redis_connection_env") if variable else None
    return _feast_redis_form(value) if value and "://" in value else value


def _feast_redis_form(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"features.redis_connection_env: {redact(url)} is not a redis:// or rediss:// URL",
                          field="features.redis_connection_env")
    pieces = [f"{parts.hostname or 'localhost'}:{parts.port or 6379}"]
    database = parts.path.strip("/")
    if database:
        pieces.append(f"db={database}")
    if parts.password:
        pieces.append(f"password={parts.password}")
    if parts.username and parts.username != "default":
        pieces.append(f"username={parts.username}")
    if parts.scheme == "rediss":
        pieces.append("ssl=true")
    return ",".join(pieces)


def repo_config(config: TuneloopConfig):
    """The in-code Feast RepoConfig: local provider and file offline store; a SQL registry and a
    Redis online store when the config names their env vars, else a file registry and SQLite."""
    from feast.repo_config import RepoConfig

    directory = feast_dir(config)
    url, redis = registry_url(config), redis_connection(config)
    registry = (
        {"registry_type": "sql", "path": url, "cache_ttl_seconds": 60,
         "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}
        if url else str(directory / "registry.db")
    )
    online = ({"type": "redis", "connection_string": redis} if redis
              else {"type": "sqlite", "path": str(directory / "online_store.db")})
    return RepoConfig(
        project=config.features.project,
        provider="local",
        registry=registry,
        offline_store={"type": "file"},
        online_store=online,
        entity_key_serialization_version=3,
        repo_path=directory,
    )


# --------------------------------------------------------------------------------------------
# Services


def check_registry_database(url: str) -> None:
    """Connect once to the SQL registry's database.

    Raises:
        ServiceUnavailableError: the database did not answer (names it without credentials).
    """
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        raise _unreachable("postgres", "Feast registry", url, reason) from error
    finally:
        engine.dispose()


def check_redis(connection: str) -> None:
    """Ping the Redis online store once.

    Raises:
        ServiceUnavailableError: Redis did not answer (names it without the password).
    """
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(connection)
    node = nodes[0] if nodes else {"host": "localhost", "port": 6379}
    known = {key: params[key] for key in ("password", "username", "db", "ssl") if key in params}
    client = redis.Redis(host=node["host"], port=int(node.get("port", 6379)), **known,
                         socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        raise _unreachable("redis", "Feast online store", connection, error) from error
    finally:
        client.close()


def _unreachable(service: str, role: str, location: str, reason: object) -> ServiceUnavailableError:
    """``<service> (<role>) unreachable at <location>: <reason>``, the location without its credentials."""
    uri = redact(location)
    return ServiceUnavailableError(f"{service} ({role}) unreachable at {uri}: {reason}", service=service, uri=uri,
                                   stage=STAGE)


@contextmanager
def outages_as_unavailable(config: TuneloopConfig, action: str):
    """Turn a service that stops answering in the middle of ``action`` into ServiceUnavailableError
    (naming the registry database, Redis or the texts source), so KFP retries instead of failing."""
    import sqlalchemy

    try:
        yield
    except TuneloopError:
        raise
    except sqlalchemy.exc.DBAPIError as error:
        if not error.connection_invalidated and not isinstance(error, sqlalchemy.exc.OperationalError):
            raise
        url = redact(registry_url(config) or "")
        raise ServiceUnavailableError(f"postgres (Feast registry) failed while {action} at {url}: "
                                      f"{type(error).__name__}", service="postgres", uri=url, stage=STAGE) from error
    except Exception as error:
        if not is_connection_error(error):
            raise
        service, uri = _failed_service(config, error)
        raise ServiceUnavailableError(f"{service} failed while {action} at {uri}: {type(error).__name__}",
                                      service=service, uri=uri, stage=STAGE) from error


def _failed_service(config: TuneloopConfig, error: BaseException) -> tuple[str, str]:
    import redis

    current = error
    while current is not None:
        if isinstance(current, redis.exceptions.RedisError):
            return "redis", redact(redis_connection(config) or "")
        current = current.__cause__ or current.__context__
    return "object store", config.data.texts


def connect(config: TuneloopConfig, *, online: bool = False):
    """A :class:`feast.FeatureStore` for the config, after checking that its services answer.

    Args:
        online: also check the Redis online store (materialising and online reads need it).

    Raises:
        ServiceUnavailableError: the registry database (or, with ``online``, Redis) is unreachable.
        ConfigError: an env var named by the config is not set.
    """
    from feast import FeatureStore

    url = registry_url(config)
    if url:
        check_registry_database(url)
    redis = redis_connection(config)
    if online and redis:
        check_redis(redis)
    directory = feast_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(directory), config=repo_config(config))


# --------------------------------------------------------------------------------------------
# Set-up and read-only use


def pending_changes(store, definitions: FeatureDefinitions) -> list[str]:
    """What applying ``definitions`` would change in the registry, one ``"<type> <name>: <change>"``
    each; empty when the registry already holds exactly these definitions. Writes nothing."""
    from feast.diff.registry_diff import TransitionType
    from feast.repo_contents import RepoContents

    desired = RepoContents(
        projects=[], data_sources=[definitions.source], feature_views=[definitions.texts_view],
        on_demand_feature_views=[definitions.statistics_view], stream_feature_views=[], label_views=[],
        entities=[definitions.entity], feature_services=[definitions.feature_service], permissions=[],
    )
    ours = {obj.name for obj in definitions.objects()}
    with quiet_feast():
        registry_diff, _, _ = store.plan(desired)
    changes = []
    for diff in registry_diff.feast_object_diffs:
        if diff.name not in ours or diff.transition_type not in (TransitionType.CREATE, TransitionType.UPDATE):
            continue
        changed = [p.property_name for p in diff.feast_object_property_diffs
                   if p.property_name != "meta" and _without_meta(p.val_existing) != _without_meta(p.val_declared)]
        if diff.transition_type == TransitionType.CREATE or changed:
            detail = f" ({', '.join(changed)})" if changed else ""
            changes.append(f"{diff.feast_object_type.value} {diff.name}: {diff.transition_type.name.lower()}{detail}")
    return changes


def _without_meta(value):
    """A protobuf value without its ``meta`` (creation and update times, materialisation intervals):
    the registry sets those itself, so they never make a definition differ."""
    if hasattr(value, "DESCRIPTOR") and "meta" in value.DESCRIPTOR.fields_by_name:
        value = type(value).FromString(value.SerializeToString())
        value.ClearField("meta")
    return value


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply` did: the registry changes (empty: it already held them) and the source."""

    changes: list[str]
    texts_source: str
    registry: str
    materialized_until: datetime | None = None
    objects: list[str] = field(default_factory=list)


def registry_location(config: TuneloopConfig) -> str:
    """The registry as a message may name it (credentials removed)."""
    url = registry_url(config)
    return redact(url) if url else str(feast_dir(config) / "registry.db")


def require_shareable_sources(config: TuneloopConfig) -> None:
    """Refuse to register a source only one pod can read: in the cluster world, or with a shared
    (SQL) registry, the texts and the offline store must be object-store URIs.

    Raises:
        ConfigError: one line naming the first field and the value it needs.
    """
    from tuneloop.world import cluster_problems, is_object_store_uri

    problems = []
    if config.world == "cluster":
        problems = [line for line in cluster_problems(config) if line.startswith(("data.", "features."))]
    elif config.features.registry_url_env:
        problems = [f"{name}: {value!r} is a path on this machine; a shared registry needs an object-store URI "
                    f"every pod reads (s3://bucket/...)"
                    for name, value in (("data.texts", config.data.texts), ("features.offline_uri", offline_location(config)))
                    if not is_object_store_uri(value)]
    if problems:
        raise ConfigError(f"cannot apply features to a shared registry: {'; '.join(problems)}",
                          stage=STAGE, field=problems[0].split(":", 1)[0])


def apply(config: TuneloopConfig, *, materialize_until: datetime | None = None) -> ApplyResult:
    """Set up the feature store of a config: the set-up step behind ``tuneloop features apply``.

    Prepares the texts source (a URI every pod can read), then applies the definitions to the
    registry only where they differ (running it twice changes nothing), then, with
    ``materialize_until``, loads the online store.

    Raises:
        DataError: the texts file is missing or malformed.
        ServiceUnavailableError: the registry database, Redis or the object store is unreachable.
    """
    require_shareable_sources(config)
    with outages_as_unavailable(config, "applying the feature definitions"):
        store = connect(config, online=materialize_until is not None)
        texts_uri = prepare_texts(config)
        definitions = build_definitions(config, texts_uri)
        changes = pending_changes(store, definitions)
        if changes:
            with quiet_feast():
                store.apply(definitions.objects())
    location = registry_location(config)
    print(f"[features] registry {location}: " + ("; ".join(changes) if changes else "unchanged"), flush=True)
    if materialize_until is not None:
        materialize(config, materialize_until, store=store)
    return ApplyResult(changes=changes, texts_source=texts_uri, registry=location,
                       materialized_until=materialize_until,
                       objects=[obj.name for obj in definitions.objects()])


def require_applied(store, config: TuneloopConfig, definitions: FeatureDefinitions) -> None:
    """Fail unless the registry holds exactly the config's definitions and the texts source is current.

    Raises:
        ConfigError: one line naming what is missing or different and the set-up command.
    """
    changes = pending_changes(store, definitions)
    if changes:
        raise ConfigError(
            f"feature registry {registry_location(config)} does not hold the definitions of "
            f"{config.name!r} ({'; '.join(changes)}): {APPLY_HINT}",
            stage=STAGE, field="features",
        )
    if definitions.texts_path == prepared_texts_uri(config):
        from tuneloop.datasets import fingerprint_frame

        recorded = prepared_fingerprint(definitions.texts_path)
        if recorded != fingerprint_frame(normalised_texts(config)):
            state = "is missing" if recorded is None else "was prepared from other texts"
            raise ConfigError(
                f"texts source {definitions.texts_path} {state} than data.texts {config.data.texts}: {APPLY_HINT}",
                stage=STAGE, field="features.offline_uri",
            )


def open_store(config: TuneloopConfig, definitions: FeatureDefinitions | None = None, *, online: bool = False):
    """A FeatureStore ready to read the config's features.

    Local world (file registry): prepares the texts and applies the definitions itself, idempotent,
    and says so. Otherwise (a SQL registry, or the cluster world) it only reads: it checks that the
    registry holds the definitions (:func:`require_applied`) and never writes.

    Raises:
        ConfigError: the registry lacks or differs from the definitions (cluster).
        ServiceUnavailableError: a service is unreachable.
    """
    store = connect(config, online=online)
    if applies_on_read(config):
        definitions = definitions or build_definitions(config, prepare_texts(config))
        if pending_changes(store, definitions):
            with quiet_feast():
                store.apply(definitions.objects())
            print(f"[features] local world: applied the definitions to the file registry "
                  f"{registry_location(config)} (in a cluster `tuneloop features apply` does this)", flush=True)
        return store
    definitions = definitions or build_definitions(config)
    require_applied(store, config, definitions)
    return store


# --------------------------------------------------------------------------------------------
# The online store


def materialize(config: TuneloopConfig, end_date: datetime | None = None, *, store=None) -> None:
    """Load the latest text of each entity (as of ``end_date``, default now) into the online store
    (SQLite locally, Redis in a cluster), looking back ``features.ttl_days``."""
    end = pd.Timestamp(end_date or datetime.now(timezone.utc))
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    start = end - pd.Timedelta(days=config.features.ttl_days)
    with outages_as_unavailable(config, "materialising the online store"):
        store = store or open_store(config, online=True)
        print(f"[features] materialising texts up to {end.isoformat()}", flush=True)
        with quiet_feast():
            store.materialize(start_date=start.to_pydatetime(), end_date=end.to_pydatetime())


def online_features(config: TuneloopConfig, ids: list[str]) -> pd.DataFrame:
    """The feature service's online features (text and statistics) of ``ids``, one row each in
    order; an unknown id gets a missing text.

    Locally an empty online store is materialised first; in a cluster that is set-up
    (``tuneloop features materialize``) and an empty store is an error.

    Raises:
        ConfigError: the registry lacks the definitions, or (cluster) nothing was materialised.
    """
    with outages_as_unavailable(config, "reading online features"):
        return _online_features(config, ids)


def _online_features(config: TuneloopConfig, ids: list[str]) -> pd.DataFrame:
    definitions = build_definitions(config, prepare_texts(config) if applies_on_read(config) else None)
    store = open_store(config, definitions, online=True)
    view = store.get_feature_view(definitions.texts_view.name)
    if not view.materialization_intervals:
        if not applies_on_read(config):
            raise ConfigError(
                f"online store of {config.name!r} holds nothing: run `tuneloop features materialize "
                f"--config <this project's tuneloop.yaml>` first", stage=STAGE, field="features",
            )
        materialize(config, store=store)
    service = store.get_feature_service(definitions.feature_service.name)
    rows = [{config.data.id_column: str(key)} for key in ids]
    with quiet_feast():
        return store.get_online_features(features=service, entity_rows=rows).to_df()
