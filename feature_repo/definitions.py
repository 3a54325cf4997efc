"""tuneloop's Feast definitions, for the Feast CLI (`feast -c feature_repo plan`, `feature-services list`).

The objects come from :func:`tuneloop.features.build_definitions`, the same function the pipeline's
``retrieve_features`` stage and ``tuneloop features apply`` use, so the CLI and the pipeline cannot
disagree. Importing this file writes nothing: the texts source is ``data.texts`` when it is a ready
Parquet file, else the copy that ``tuneloop features apply`` prepares under ``features.offline_uri``.

The config is read from ``$TUNELOOP_CONFIG`` (default ``../examples/sms_spam/tuneloop.yaml``,
relative to this folder); in the local world a relative ``state_dir`` resolves against the project
root (this folder's parent), matching the registry paths in ``feature_store.yaml``. The cluster
flavour (``cluster/``) loads this same file.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuneloop.config import load_config, resolve_config_paths
from tuneloop.features import build_definitions

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parent
DEFAULT_CONFIG = HERE / ".." / "examples" / "sms_spam" / "tuneloop.yaml"


def _config_path() -> Path:
    configured = os.environ.get("TUNELOOP_CONFIG")
    if not configured:
        return DEFAULT_CONFIG.resolve()
    path = Path(configured).expanduser()
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def _load():
    path = _config_path()
    config = load_config(path, resolve_paths=False)
    if config.world == "local" and not Path(config.state_dir).is_absolute():
        config.state_dir = PROJECT_ROOT / config.state_dir
    return resolve_config_paths(config, base_dir=path.parent)


_definitions = build_definitions(_load())

entity = _definitions.entity
texts_source = _definitions.source
texts_view = _definitions.texts_view
text_statistics_view = _definitions.statistics_view
feature_service = _definitions.feature_service
