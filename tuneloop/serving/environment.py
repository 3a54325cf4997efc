"""The server process's environment: its variables, the config they name, and stopping on a start-up error."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping

from tuneloop.config import TuneloopConfig, load_config, resolve_config_paths

logger = logging.getLogger("tuneloop.serving")

STAGE = "serving"
CONFIG_ENV = "TUNELOOP_CONFIG"
VERSION_ENV = "TUNELOOP_MODEL_VERSION"
MODEL_DIR_ENV = "TUNELOOP_MODEL_DIR"
"""A local (Compressed) Model directory to serve instead of a registry version (tests, benchmarks,
images with a baked-in model); its version label is ``$TUNELOOP_MODEL_VERSION`` or ``local``."""
MODEL_CACHE_ENV = "TUNELOOP_MODEL_CACHE_DIR"
"""Where downloaded model versions are kept (default ``$XDG_CACHE_HOME/tuneloop/models``, else
``<state_dir>/serving/models``)."""
DEFAULT_CONFIG = "tuneloop.yaml"
WORKDIR_ENV = "TUNELOOP_WORKDIR"
"""The directory a relative ``$TUNELOOP_CONFIG``, ``state_dir`` and log path are taken against.
``bentoml serve serving/`` runs its workers inside ``serving/``, so the default is ``$PWD`` (the
directory the server was started from, as the shell recorded it) before the worker's own directory;
``tuneloop serve`` sets it explicitly."""


def stop_server_on_startup_error(error: BaseException) -> None:
    """Log why the model could not be served and, inside a ``bentoml serve`` worker, stop the whole
    server: BentoML would otherwise respawn the failing worker forever and the process would look
    alive while serving nothing. Outside a BentoML server (tests, an ASGI host) it only logs."""
    logger.error("tuneloop serving cannot start: %s", error)
    print(f"error: tuneloop serving cannot start: {error}", file=sys.stderr, flush=True)
    if "BENTOML_RUNNER_MAP" not in os.environ:
        return
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        if any("bentoml" in part for part in parent.cmdline()):
            parent.terminate()
    except Exception:  # best effort: the worker still fails
        logger.exception("could not stop the BentoML server process")


def load_serving_config(environ: Mapping[str, str] | None = None) -> TuneloopConfig:
    """The config named by ``$TUNELOOP_CONFIG`` (default ``tuneloop.yaml``), with relative paths (the
    config file itself, ``state_dir``, a local ``deployment.prediction_log_uri``) taken against
    ``$TUNELOOP_WORKDIR``, else ``$PWD``, else the working directory.

    Raises:
        ConfigError: the file is missing or invalid, or a ``world: cluster`` config keeps shared
            state on the replica's own disk.
    """
    from tuneloop.world import require_cluster_ready

    environ = os.environ if environ is None else environ
    workdir = Path(environ.get(WORKDIR_ENV) or environ.get("PWD") or os.getcwd())
    if not workdir.is_dir():
        workdir = Path.cwd()
    path = Path(environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    path = path if path.is_absolute() else workdir / path
    config = load_config(path, resolve_paths=False)
    if not Path(config.state_dir).is_absolute():
        config.state_dir = workdir / config.state_dir
    log_uri = config.deployment.prediction_log_uri
    if log_uri and "://" not in log_uri and not Path(log_uri).is_absolute():
        config.deployment.prediction_log_uri = str(workdir / log_uri)
    if config.world == "cluster":
        require_cluster_ready(config, action="serve")
    return resolve_config_paths(config, base_dir=path.resolve().parent)
