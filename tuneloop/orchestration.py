"""Loading, compiling and running pipelines.

The shipped pipelines are modules of the ``pipelines`` package that the tuneloop wheel installs
(``pipelines.training``, ``pipelines.monitoring``) and are named by their short name
(``training``, ``monitoring``); any other pipeline is a file given by its path. Nothing is found by
scanning ``sys.path`` or the working directory. A local run goes through ``kfp.local`` with the
SubprocessRunner in the current interpreter, so every component body runs exactly the code it runs
in the cluster image.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import inspect
import io
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.config import KubeflowConfig, SecretEnvConfig, TuneloopConfig, resolve_base_model
from tuneloop.datasets import read_table, require_columns
from tuneloop.errors import PipelineError

ERROR_LINE = re.compile(r"^tuneloop\.errors\.(\w+): (.*)$")

SHIPPED_PIPELINES = {"training": "pipelines.training", "monitoring": "pipelines.monitoring"}
"""The pipelines the wheel ships, by the name ``tuneloop compile``/``run`` accept."""

SERVING_API_KEY_SECRET = ("tuneloop-serving", "api-key")
"""The Secret and key holding the serving API key (the deploy step's smoke requests send it)."""


def shipped_pipeline_file(name: str) -> Path:
    """The installed source file of a shipped pipeline (``training`` -> ``.../pipelines/training.py``).

    Raises:
        PipelineError: ``name`` is not a shipped pipeline.
    """
    if name not in SHIPPED_PIPELINES:
        raise PipelineError(f"unknown pipeline {name!r}: the shipped ones are {', '.join(SHIPPED_PIPELINES)}",
                            path=name)
    return Path(str(importlib.resources.files("pipelines").joinpath(f"{name}.py")))


def load_pipeline(pipeline: str | Path, kubeflow: KubeflowConfig | None = None, *, tuning=None):
    """Return the ``@dsl.pipeline`` function of a shipped pipeline (by name) or of a pipeline file.

    ``pipeline`` is ``training`` or ``monitoring`` (imported as ``pipelines.<name>``), or the path of
    a ``.py`` file. A module that defines ``build_pipeline(kubeflow)`` gets the cluster settings, and
    the ``tuning`` section too when its ``build_pipeline`` takes a ``tuning`` argument.

    Raises:
        PipelineError: an unknown name, a missing file, an import error, or no pipeline in it.
    """
    if str(pipeline) in SHIPPED_PIPELINES:
        name = str(pipeline)
        try:
            module = importlib.import_module(SHIPPED_PIPELINES[name])
        except ImportError as error:
            raise PipelineError(f"cannot import the shipped pipeline {name!r}: {error}", path=name) from error
        return _pipeline_of(module, name, kubeflow, tuning=tuning)
    path = Path(pipeline).expanduser()
    if not path.is_file():
        hint = "" if path.suffix == ".py" else f" (the shipped pipelines are {', '.join(SHIPPED_PIPELINES)})"
        raise PipelineError(f"pipeline file not found: {pipeline}{hint}", path=str(pipeline))
    path = path.resolve()
    spec = importlib.util.spec_from_file_location(f"_tuneloop_pipeline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise PipelineError(f"cannot import pipeline file {path}: {error}", path=str(path)) from error
    return _pipeline_of(module, path.stem, kubeflow, where=str(path), tuning=tuning)


def _pipeline_of(module, stem: str, kubeflow: KubeflowConfig | None, *, where: str | None = None, tuning=None):
    from kfp.dsl.graph_component import GraphComponent

    if kubeflow is not None and hasattr(module, "build_pipeline"):
        if tuning is not None and "tuning" in inspect.signature(module.build_pipeline).parameters:
            return module.build_pipeline(kubeflow, tuning=tuning)
        return module.build_pipeline(kubeflow)
    pipelines = [value for value in vars(module).values() if isinstance(value, GraphComponent)]
    if not pipelines:
        raise PipelineError(f"{where or module.__name__} defines no @dsl.pipeline function", path=where or stem)
    preferred = [p for p in pipelines if p.name.endswith(stem) or stem in p.name]
    return (preferred or pipelines)[0]


def compile_pipeline(
    pipeline: str | Path,
    output: str | Path,
    config: TuneloopConfig | None = None,
    kubeflow: KubeflowConfig | None = None,
) -> Path:
    """Compile a shipped pipeline (``training``, ``monitoring``) or a pipeline file to KFP IR YAML.

    Args:
        config: becomes the default of the ``config_json`` parameter; its ``kubeflow`` section
            sets images, GPU, resources, secrets and retries unless ``kubeflow`` is given. It must
            be a coherent cluster config (:func:`tuneloop.world.require_cluster_ready`), and every
            credential it names by environment variable must come from one of ``kubeflow.secrets``.
        kubeflow: cluster settings to compile with.

    Raises:
        ConfigError: the config would keep shared state on one pod, or names a credential variable
            that no Secret fills.
        PipelineError: the pipeline cannot be loaded.
    """
    from kfp import compiler

    kubeflow = kubeflow or (config.kubeflow if config is not None else None)
    if config is not None:
        from tuneloop.world import require_cluster_ready

        require_cluster_ready(config, action="compile")
        kubeflow = with_serving_api_key(kubeflow, config.deployment.api_key_env)
        kubeflow = with_serving_device(kubeflow, config)
        require_credential_secrets(config, kubeflow)
    pipeline = load_pipeline(pipeline, kubeflow, tuning=config.tuning if config is not None else None)
    parameters = {"config_json": config.to_json()} if config is not None else None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output), pipeline_parameters=parameters)
    return output


def with_serving_api_key(kubeflow: KubeflowConfig, api_key_env: str) -> KubeflowConfig:
    """``kubeflow`` with the serving API key Secret given to the ``deploy`` step as ``api_key_env``,
    unless an entry of ``kubeflow.secrets`` already fills that variable for ``deploy``."""
    if any(secret.env == api_key_env and secret.applies_to("deploy") for secret in kubeflow.secrets):
        return kubeflow
    name, key = SERVING_API_KEY_SECRET
    entry = SecretEnvConfig(secret=name, key=key, env=api_key_env, steps=["deploy"])
    return kubeflow.model_copy(update={"secrets": [*kubeflow.secrets, entry]})


def with_serving_device(kubeflow: KubeflowConfig, config: TuneloopConfig) -> KubeflowConfig:
    """``kubeflow`` with ``compress`` and ``evaluate`` on GPU nodes when the model serves on one
    (``deployment.device: cuda``): compress builds and measures TensorRT engines there and evaluate
    must load the kept engine. Checks first that the variant list keeps something that runs there.

    Raises:
        ConfigError: ``compression.variants`` holds nothing that runs on ``deployment.device``.
    """
    from tuneloop.compression.choose import eligible_variants

    eligible_variants(config.compression.candidates(), config.deployment.device)
    if config.deployment.device != "cuda":
        return kubeflow
    steps = list(dict.fromkeys([*kubeflow.gpu.steps, "compress", "evaluate"]))
    return kubeflow.model_copy(update={"gpu": kubeflow.gpu.model_copy(update={"steps": steps})})


def credential_variables(config: TuneloopConfig) -> dict[str, str]:
    """The environment variables holding credentials that the config names, by config field."""
    named = {
        "state.database_url_env": config.state.database_url_env,
        "features.registry_url_env": config.features.registry_url_env,
        "features.redis_connection_env": config.features.redis_connection_env,
        "deployment.api_key_env": config.deployment.api_key_env,
        "tuning.storage_url_env": config.tuning.storage_url_env if config.tuning.in_pipeline else None,
    }
    return {field: env for field, env in named.items() if env}


def require_credential_secrets(config: TuneloopConfig, kubeflow: KubeflowConfig) -> None:
    """Refuse a cluster config that names a credential variable no ``kubeflow.secrets`` entry fills
    (the step would start without it and fail far from the cause).

    Raises:
        ConfigError: one line per unfilled variable, naming the field and the entry it needs.
    """
    from tuneloop.errors import ConfigError

    filled = {secret.env for secret in kubeflow.secrets}
    problems = [
        f"{field}: {env!r} is filled by no kubeflow.secrets entry; add "
        f"{{secret: <Secret name>, key: <key>, env: {env}}}"
        for field, env in credential_variables(config).items() if env not in filled
    ]
    if problems:
        raise ConfigError(
            f"cannot compile for a cluster: {len(problems)} credential variable(s) come from no Secret:\n"
            + "\n".join(f"  - {problem}" for problem in problems),
            field="kubeflow.secrets",
        )


def preflight(config: TuneloopConfig, base_model: str | None = None) -> None:
    """Check what would otherwise fail minutes into a run: the base model and the data files
    (local paths or object-store URIs, read with :func:`tuneloop.datasets.read_table`).

    Raises:
        ConfigError: the base model does not exist.
        DataError: a data file is missing, unreadable, or lacks a configured column.
        ServiceUnavailableError: the object store holding a data file could not be reached.
    """
    resolve_base_model(base_model or config.training.base_model)
    data = config.data
    texts = read_table(data.texts, what="texts file (data.texts)")
    require_columns(texts, [data.id_column, data.timestamp_column, data.text_column], path=data.texts, what="texts file")
    labels = read_table(data.labels, what="labels file (data.labels)")
    require_columns(labels, [data.id_column, data.timestamp_column, data.label_column], path=data.labels, what="labels file")


@dataclass
class LocalRun:
    """A finished local pipeline run: its name, its output folder and how long it took."""

    name: str
    root: Path
    seconds: float
    resume_lines: list[str] = field(default_factory=list)

    def task_output(self, task: str, output: str) -> Path:
        """Where a task's output artifact was written."""
        return self.root / task / output


def run_local(
    config: TuneloopConfig,
    pipeline: str | Path = "training",
    *,
    base_model: str = "",
    epochs: int = 0,
    learning_rate: float = 0.0,
    resume: str | None = None,
) -> LocalRun:
    """Run a pipeline (the shipped ``training`` by default, or a pipeline file) through ``kfp.local``
    in this interpreter. ``resume`` names an earlier local run whose finished steps are reused
    (see :mod:`tuneloop.local_resume`).

    Raises:
        PipelineError: a task failed (the message carries the task's own tuneloop error), or
            ``resume`` names no local run.
    """
    from kfp import local

    from tuneloop.local_resume import steps_recorded

    pipeline = load_pipeline(pipeline)
    preflight(config, base_model)
    pipeline_root = Path(config.state_dir) / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    started = time.monotonic()
    log = _Tee(sys.stdout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), \
                steps_recorded(pipeline_root, resume) as resumed:
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            pipeline(config_json=config.to_json(), base_model=base_model, epochs=epochs, learning_rate=learning_rate)
    except RuntimeError as error:
        raise PipelineError(_failure_message(log.getvalue(), error), stage="pipeline") from None
    run_dirs = sorted(set(pipeline_root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    if not run_dirs:
        raise PipelineError(f"the local run wrote no outputs under {pipeline_root}", path=str(pipeline_root))
    return LocalRun(run_dirs[-1].name, run_dirs[-1], time.monotonic() - started, resumed.lines(run_dirs[-1]))


def _failure_message(log: str, error: Exception) -> str:
    """The failing task's tuneloop error (with its listed failures), else KFP's own message."""
    lines = log.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = ERROR_LINE.match(lines[index].strip())
        if match:
            indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
            details = []
            for line in lines[index + 1 :]:
                if not line.startswith(indent + "  - "):
                    break
                details.append(line[len(indent) :])
            return "\n".join([match.group(2), *details])
    return f"pipeline run failed: {error}"


class _Tee(io.TextIOBase):
    """Writes through to the terminal and keeps a copy, to find the failing task's error.

    The KFP executor logs each task's whole executor input (dozens of lines of JSON holding the
    config) at INFO level; that block is folded into one line so progress stays readable.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self._copy = io.StringIO()
        self._pending = ""
        self._closing_line: str | None = None

    def write(self, text: str) -> int:
        self._copy.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        if self._closing_line is not None:
            if line.rstrip() == self._closing_line:
                self._closing_line = None
            return
        if line.rstrip().endswith("Got executor_input:"):
            indent = line[: len(line) - len(line.lstrip())]
            self._closing_line = indent + "}"
            self._stream.write(line.rstrip() + " (folded)\n")
            return
        self._stream.write(line + "\n")

    def flush(self) -> None:
        if self._pending and self._closing_line is None:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def getvalue(self) -> str:
        return self._copy.getvalue()
