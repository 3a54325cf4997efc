"""Model loading: resolve a registry version, download it once into the cache, load it and prove it predicts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tuneloop.config import TuneloopConfig
from tuneloop.errors import ModelError, RegistryError
from tuneloop.serving.environment import MODEL_CACHE_ENV, STAGE, VERSION_ENV

WARMUP_TEXT = "tuneloop warm-up"
_COMPLETE_MARKER = ".tuneloop-complete"


@dataclass
class LoadedModel:
    """A model ready to serve: its registry version, local directory and classifier."""

    version: str
    directory: Path
    classifier: Any

    @property
    def labels(self) -> list[str]:
        return list(self.classifier.labels)

    @property
    def runtime(self) -> str:
        return getattr(self.classifier, "runtime", type(self.classifier).__name__)


def model_cache_dir(config: TuneloopConfig, environ: Mapping[str, str] | None = None) -> Path:
    """Where downloaded registry versions are kept, per model name: ``$TUNELOOP_MODEL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tuneloop/models`` (a pod with a read-only root file system sets it to a volume),
    else ``<state_dir>/serving/models``."""
    environ = os.environ if environ is None else environ
    if environ.get(MODEL_CACHE_ENV):
        root = Path(environ[MODEL_CACHE_ENV])
    elif environ.get("XDG_CACHE_HOME"):
        root = Path(environ["XDG_CACHE_HOME"]) / "tuneloop" / "models"
    else:
        root = Path(config.state_dir) / "serving" / "models"
    return root / _safe_name(config.registry.model_name)


def fetch_model(config: TuneloopConfig, version: str | None = None) -> tuple[str, Path]:
    """Resolve ``version`` (None: the ``champion`` alias) and download it once into the cache.

    Returns:
        the version and the local Compressed Model directory.

    Raises:
        RegistryError: no champion, an unknown or malformed version, or the download failed.
    """
    from tuneloop import registry

    name = config.registry.model_name
    if version is None:
        version = registry.alias_version(config, registry.CHAMPION)
        if version is None:
            raise RegistryError(
                f"cannot start: model {name!r} has no {registry.CHAMPION!r} alias in the registry at "
                f"{registry._safe_uri(config)}; register a model first (tuneloop run --local) or pin a version "
                f"with ${VERSION_ENV} or deployment.model_version",
                stage=STAGE, field="deployment.model_version",
            )
    version = str(version).strip()
    source = model_version_source(config, version)
    target = model_cache_dir(config) / version
    if (target / _COMPLETE_MARKER).is_file():
        return version, target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".download-{version}-", dir=target.parent))
    except OSError as error:
        raise RegistryError(f"cannot start: the model cache {target.parent} is not writable ({error}); set "
                            f"${MODEL_CACHE_ENV} to a writable folder", stage=STAGE, path=str(target.parent),
                            field=MODEL_CACHE_ENV) from error
    try:
        from mlflow.artifacts import download_artifacts

        local = Path(download_artifacts(artifact_uri=source, dst_path=str(scratch), tracking_uri=config.tracking_uri))
        (local / _COMPLETE_MARKER).write_text(source, encoding="utf-8")
        try:
            local.rename(target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # not another worker finishing first
                shutil.rmtree(target, ignore_errors=True)
                local.rename(target)
    except RegistryError:
        raise
    except Exception as error:
        raise RegistryError(f"cannot start: downloading version {version} of {name!r} failed: {error}",
                            stage=STAGE) from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return version, target


def model_version_source(config: TuneloopConfig, version: str) -> str:
    """The artifact URI of a registered version.

    Raises:
        RegistryError: the version is not a number or does not exist (naming the ones that do).
    """
    from mlflow.exceptions import MlflowException

    from tuneloop import registry

    name = config.registry.model_name
    if not re.fullmatch(r"[0-9]+", str(version)):
        raise RegistryError(f"model version {version!r} is not a registry version number", stage=STAGE,
                            field=VERSION_ENV)
    try:
        return registry.client(config).get_model_version(name, str(version)).source
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error.error_code):
            raise RegistryError(f"registry unreachable at {registry._safe_uri(config)}: {error}",
                                stage=STAGE) from error
    known = [row["version"] for row in registry.list_versions(config)]
    raise RegistryError(
        f"model version {version} of {name!r} does not exist in the registry at {registry._safe_uri(config)} "
        f"(registered versions: {', '.join(reversed(known)) or 'none'})",
        stage=STAGE, field="deployment.model_version",
    )


def load_model(directory: str | Path, version: str) -> LoadedModel:
    """Load a (Compressed) Model directory and prove it predicts; a broken artifact fails here.

    Raises:
        ModelError: the artifact is missing, corrupt, or cannot run on this machine.
    """
    from tuneloop.runtime import load_classifier

    directory = Path(directory)
    try:
        with _serving_threads():
            classifier = load_classifier(directory)
        probabilities = classifier.predict_proba([WARMUP_TEXT], batch_size=1)
    except ModelError as error:
        raise ModelError(f"cannot start: model version {version} is unusable: {error.message}",
                         stage=STAGE, path=error.path or str(directory), field=error.field) from error
    except Exception as error:
        raise ModelError(f"cannot start: model version {version} in {directory} failed a test prediction: "
                         f"{type(error).__name__}: {error}", stage=STAGE, path=str(directory)) from error
    import numpy as np

    if probabilities.shape != (1, len(classifier.labels)) or not np.all(np.isfinite(probabilities)):
        raise ModelError(f"cannot start: model version {version} in {directory} returns invalid probabilities "
                         f"{probabilities.tolist()}", stage=STAGE, path=str(directory))
    return LoadedModel(version=str(version), directory=directory, classifier=classifier)


@contextlib.contextmanager
def _serving_threads():
    """ONNX Runtime threads while loading for serving: ``$TUNELOOP_ORT_THREADS`` when set, else one
    fewer than the CPUs this process may use (at least one), leaving a core to the HTTP event loop.
    Measured on 2 CPUs: one ORT thread served more requests per second than two, whose spinning
    competed with the event loop."""
    from tuneloop.runtime import THREADS_ENV, available_cpus

    if os.environ.get(THREADS_ENV, "").strip():
        yield
        return
    with _ENV_LOCK:
        os.environ[THREADS_ENV] = str(max(1, available_cpus() - 1))
        try:
            yield
        finally:
            os.environ.pop(THREADS_ENV, None)


_ENV_LOCK = threading.Lock()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"
