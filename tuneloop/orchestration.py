"""Loading, compiling and running pipelines.

Pipelines live in the project's ``pipelines/`` folder and import ``components/``; both are loaded by
path, with the folder above ``pipelines/`` put on ``sys.path``. A local run goes through
``kfp.local`` with the SubprocessRunner in the current interpreter, so every component body runs
exactly the code it runs in the cluster image.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config import KubeflowConfig, TuneloopConfig, resolve_base_model
from tuneloop.datasets import read_table, require_columns
from tuneloop.errors import PipelineError

ERROR_LINE = re.compile(r"^tuneloop\.errors\.(\w+): (.*)$")


def load_pipeline(pipeline_file: str | Path, kubeflow: KubeflowConfig | None = None):
    """Import a pipeline file by path and return its ``@dsl.pipeline`` function.

    A file that defines ``build_pipeline(kubeflow)`` gets the cluster settings passed in.

    Raises:
        PipelineError: the file is missing, fails to import, or defines no pipeline.
    """
    from kfp.dsl.graph_component import GraphComponent

    path = Path(pipeline_file).resolve()
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {pipeline_file}", path=str(pipeline_file))
    project_root = str(path.parent.parent)
    if project_root not in sys.path:
        sys.path.insert(0, project_root)
    module_name = f"_tuneloop_pipeline_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise PipelineError(f"cannot import pipeline file {path}: {error}", path=str(path)) from error
    if kubeflow is not None and hasattr(module, "build_pipeline"):
        return module.build_pipeline(kubeflow)
    pipelines = [value for value in vars(module).values() if isinstance(value, GraphComponent)]
    if not pipelines:
        raise PipelineError(f"{path} defines no @dsl.pipeline function", path=str(path))
    preferred = [p for p in pipelines if p.name.endswith(path.stem) or path.stem in p.name]
    return (preferred or pipelines)[0]


def compile_pipeline(
    pipeline_file: str | Path,
    output: str | Path,
    config: TuneloopConfig | None = None,
    kubeflow: KubeflowConfig | None = None,
) -> Path:
    """Compile a pipeline file to KFP IR YAML.

    Args:
        config: becomes the default of the ``config_json`` parameter; its ``kubeflow`` section
            sets images, GPU, resources, secrets and retries unless ``kubeflow`` is given.
        kubeflow: cluster settings to compile with.
    """
    from kfp import compiler

    kubeflow = kubeflow or (config.kubeflow if config is not None else None)
    pipeline = load_pipeline(pipeline_file, kubeflow)
    parameters = {"config_json": config.to_json()} if config is not None else None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output), pipeline_parameters=parameters)
    return output


def preflight(config: TuneloopConfig, base_model: str | None = None) -> None:
    """Check what would otherwise fail minutes into a run: the base model and the data files.

    Raises:
        ConfigError: the base model does not exist.
        DataError: a data file is missing, unreadable, or lacks a configured column.
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

    def task_output(self, task: str, output: str) -> Path:
        """Where a task's output artifact was written."""
        return self.root / task / output


def run_local(
    config: TuneloopConfig,
    pipeline_file: str | Path,
    *,
    base_model: str = "",
    epochs: int = 0,
    learning_rate: float = 0.0,
) -> LocalRun:
    """Run the training pipeline through ``kfp.local`` in this interpreter.

    Raises:
        PipelineError: a task failed; the message carries the task's own tuneloop error.
    """
    from kfp import local

    preflight(config, base_model)
    pipeline = load_pipeline(pipeline_file)
    pipeline_root = Path(config.state_dir) / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    before = set(pipeline_root.glob("*")) if pipeline_root.exists() else set()
    started = time.monotonic()
    log = _Tee(sys.stdout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            pipeline(config_json=config.to_json(), base_model=base_model, epochs=epochs, learning_rate=learning_rate)
    except RuntimeError as error:
        raise PipelineError(_failure_message(log.getvalue(), error), stage="pipeline") from None
    run_dirs = sorted(set(pipeline_root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    if not run_dirs:
        raise PipelineError(f"the local run wrote no outputs under {pipeline_root}", path=str(pipeline_root))
    return LocalRun(run_dirs[-1].name, run_dirs[-1], time.monotonic() - started)


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
