"""The Bento: find the ``serving/`` folder and build it into BentoML's store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneloop.config import TuneloopConfig
from tuneloop.deployment.common import SERVING_DIR_ENV, DeploymentError


def build_bento(config: TuneloopConfig, version: str | None = None, *, store_dir: str | Path | None = None) -> str:
    """Build the Bento from ``serving/bentofile.yaml`` (offline: nothing is resolved or locked) into
    BentoML's store (``$BENTOML_HOME``, or ``store_dir``) and return its tag. The Bento holds the
    service code; the model is fetched from the registry when the server starts.

    Raises:
        DeploymentError: the service cannot be imported or the build fails.
    """
    import bentoml

    directory = serving_dir()
    options: dict[str, Any] = {}
    if store_dir is not None:
        from bentoml._internal.bento import BentoStore

        Path(store_dir).mkdir(parents=True, exist_ok=True)
        options["_bento_store"] = BentoStore(str(store_dir))
    labels = {"model-name": _label_value(config.registry.model_name)}
    if version:
        labels["model-version"] = str(version)
    try:
        bento = bentoml.bentos.build_bentofile(str(directory / "bentofile.yaml"), build_ctx=str(directory),
                                               labels=labels, **options)
    except Exception as error:  # BentoML raises many types (import errors of the service included)
        raise DeploymentError(f"building the Bento from {directory / 'bentofile.yaml'} failed: {error}",
                              path=str(directory)) from error
    return str(bento.tag)


def serving_dir() -> Path:
    """The ``serving/`` folder (``service.py`` + ``bentofile.yaml``): ``$TUNELOOP_SERVING_DIR`` when set,
    else the ``serving`` package installed with tuneloop (found with ``importlib.resources``).

    Raises:
        DeploymentError: the folder does not hold the service.
    """
    import importlib.resources

    configured = os.environ.get(SERVING_DIR_ENV)
    if configured:
        candidate = Path(configured)
    else:
        try:
            candidate = Path(str(importlib.resources.files("serving")))
        except ModuleNotFoundError:
            raise DeploymentError("the serving package is not installed; reinstall tuneloop (its wheel ships "
                                  f"serving/) or set {SERVING_DIR_ENV}", field=SERVING_DIR_ENV) from None
    if (candidate / "service.py").is_file() and (candidate / "bentofile.yaml").is_file():
        return candidate.resolve()
    raise DeploymentError(f"{candidate} holds no service.py + bentofile.yaml (the serving/ folder)",
                          path=str(candidate), field=SERVING_DIR_ENV)


def _label_value(value: str) -> str:
    import re

    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value).strip("-.")[:63]
    return cleaned or "model"
