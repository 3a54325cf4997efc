"""Feature retrieval with Feast: the point-in-time correct training set, split by a stable hash.

One set of Feast definitions (:func:`build_definitions`) backs the pipeline's ``retrieve_features``
step, the ``tuneloop features`` commands and the Feast CLI repository in ``feature_repo/``.

Two worlds (see :mod:`tuneloop.features.store`):

- local: file registry and SQLite online store under ``<state_dir>/feast``, sources under
  ``<state_dir>/feature_data``; a run applies the definitions itself (zero set-up).
- cluster: SQL registry (Postgres), Redis online store, sources on object storage. ``tuneloop
  features apply`` (set-up, also in CI/CD) is the only writer of the registry; runs only read and
  fail with one line naming that command when the registry lacks the definitions.

Modules: :mod:`~tuneloop.features.statistics` (the text statistics shared with serving and
monitoring), :mod:`~tuneloop.features.definitions` (Feast objects, the texts source),
:mod:`~tuneloop.features.store` (registry, online store, services, apply, read-only checks),
:mod:`~tuneloop.features.training_set` (:func:`run`, the Dataset artifact).
"""

from tuneloop.features.definitions import (
    EVENT_TIMESTAMP,
    STAGE,
    STATISTICS_VIEW,
    FeatureDefinitions,
    build_definitions,
    feature_service_name,
    offline_location,
    prepare_texts,
    prepared_texts_uri,
    sanitize_name,
    texts_source_uri,
)
from tuneloop.features.statistics import STATISTIC_COLUMNS, text_statistics
from tuneloop.features.store import (
    ApplyResult,
    apply,
    connect,
    feast_dir,
    materialize,
    online_features,
    open_store,
    redact,
    repo_config,
    require_applied,
)
from tuneloop.features.training_set import FeatureSummary, run

__all__ = [
    "EVENT_TIMESTAMP", "STAGE", "STATISTICS_VIEW", "STATISTIC_COLUMNS", "ApplyResult", "FeatureDefinitions",
    "FeatureSummary", "apply", "build_definitions", "connect", "feast_dir", "feature_service_name",
    "materialize", "offline_location", "online_features", "open_store", "prepare_texts", "prepared_texts_uri",
    "redact", "repo_config", "require_applied", "run", "sanitize_name", "text_statistics", "texts_source_uri",
]
