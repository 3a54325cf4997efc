"""Restart a local run from the failed step: ``tuneloop run --local --resume RUN``.

Every local run records, for each step that succeeds, a fingerprint of what went in (the step, its
parameters, the content of its input artifacts and of the config's local data files) and of what
came out (the content of each output artifact), in ``<run>/.tuneloop-steps/``. A resumed run
executes the pipeline again through ``kfp.local``; a step whose input fingerprint matches a record
of RUN and whose recorded outputs still hash to what was recorded is not executed: its outputs are
hard-linked (or copied) into the new run and handed downstream. Anything changed runs again.
``finetune`` of the resumed run checkpoints under RUN's key, so it resumes from RUN's checkpoint.

kfp.local has no hook for this, so the recorder wraps ``kfp.local.task_dispatcher
.run_single_task_implementation`` (kfp is pinned to 2.17.*) for the duration of one run only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tuneloop.errors import PipelineError

STEPS_DIR = ".tuneloop-steps"
CHECKPOINT_RUN_ENV = "TUNELOOP_CHECKPOINT_RUN"
"""Set during a resumed local run: ``finetune`` keys its checkpoints by this run name instead."""
RUN_SPECIFIC_PARAMETERS = ("pipeline_run", "task_name")
"""Parameters that name the run itself and so differ in every run; they are left out of fingerprints."""


@dataclass
class ResumeReport:
    """What a resumed run took over from RUN and what it did again."""

    resumed_run: str | None
    reused: list[str] = field(default_factory=list)
    rerun: dict[str, str] = field(default_factory=dict)  # step -> why it ran again

    def lines(self, new_root: Path) -> list[str]:
        """Summary lines: reused steps, and the step training resumed from."""
        if not self.resumed_run:
            return []
        lines = [f"resume of {self.resumed_run}: reused {', '.join(self.reused) or 'no step'} "
                 "(output fingerprints verified)"]
        lines += [f"resume: {step} ran again ({why})" for step, why in self.rerun.items()]
        metadata = new_root / "finetune" / "model" / "tuneloop.json"
        if "finetune" not in self.reused and metadata.is_file():
            run = json.loads(metadata.read_text(encoding="utf-8")).get("metrics", {}).get("run", {})
            step = run.get("resumed_from_step", 0)
            lines.append(f"resume: finetune resumed training from step {step}" if step
                         else "resume: finetune found no checkpoint and trained from step 0")
        return lines


def find_run(pipeline_root: Path, name: str) -> Path:
    """The folder of an earlier local run.

    Raises:
        PipelineError: no run of that name (the most recent ones are listed).
    """
    candidate = pipeline_root / name
    if name and "/" not in name and candidate.is_dir():
        return candidate
    runs = sorted((p for p in pipeline_root.glob("*") if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True) if pipeline_root.is_dir() else []
    listed = ", ".join(p.name for p in runs[:5]) or "none"
    raise PipelineError(f"--resume {name}: no local run of that name under {pipeline_root} (latest: {listed})",
                        path=str(pipeline_root), field="--resume")


@contextlib.contextmanager
def steps_recorded(pipeline_root: Path, resume: str | None = None) -> Iterator[ResumeReport]:
    """Record each finished step's fingerprints; with ``resume``, reuse RUN's verified steps."""
    from kfp.local import task_dispatcher

    resumed_dir = find_run(pipeline_root, resume) if resume else None
    report = ResumeReport(resume)
    original = task_dispatcher.run_single_task_implementation

    def run_task(**kwargs):
        return _run_or_reuse(original, kwargs, resumed_dir, report)

    previous_env = os.environ.get(CHECKPOINT_RUN_ENV)
    task_dispatcher.run_single_task_implementation = run_task
    if resume:
        os.environ[CHECKPOINT_RUN_ENV] = resume
    try:
        yield report
    finally:
        task_dispatcher.run_single_task_implementation = original
        if resume:
            if previous_env is None:
                os.environ.pop(CHECKPOINT_RUN_ENV, None)
            else:
                os.environ[CHECKPOINT_RUN_ENV] = previous_env


def _run_or_reuse(original, kwargs: dict, resumed_dir: Path | None, report: ResumeReport):
    from kfp.local import status
    from kfp.local.executor_input_utils import get_local_task_resource_name

    component = kwargs["component_name"]
    step = get_local_task_resource_name(component)
    new_dir = Path(kwargs["pipeline_root"]) / kwargs["pipeline_resource_name"]
    fingerprint = input_fingerprint(component, kwargs["arguments"])
    if resumed_dir is not None:
        outputs, why = _reusable_outputs(resumed_dir, new_dir, step, fingerprint)
        if outputs is not None:
            report.reused.append(step)
            print(f"resume: {step} reused from {resumed_dir.name} (fingerprints verified)", flush=True)
            _write_record(new_dir, step, fingerprint, outputs)
            return outputs, status.Status.SUCCESS
        report.rerun[step] = why
    outputs, task_status = original(**kwargs)
    if task_status == status.Status.SUCCESS:
        _write_record(new_dir, step, fingerprint, outputs)
    return outputs, task_status


def input_fingerprint(component: str, arguments: dict[str, Any]) -> str:
    """SHA-256 of the step, its parameters and the content of its input artifacts and data files."""
    from kfp import dsl

    digest = hashlib.sha256(component.encode())
    for name in sorted(arguments):
        if name in RUN_SPECIFIC_PARAMETERS:
            continue
        value = arguments[name]
        digest.update(f"\0{name}=".encode())
        if isinstance(value, dsl.Artifact):
            digest.update(content_hash(Path(value.path)).encode())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
        if name == "config_json":
            for path in _local_data_files(value):
                digest.update(f"\0{path}:{content_hash(path)}".encode())
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """SHA-256 over a file, or over every file of a directory with its relative name."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _local_data_files(config_json: Any) -> list[Path]:
    try:
        data = json.loads(config_json).get("data", {})
    except (TypeError, ValueError, AttributeError):
        return []
    return [Path(data[key]) for key in ("texts", "labels") if data.get(key) and "://" not in str(data[key])
            and Path(data[key]).is_file()]


def _write_record(run_dir: Path, step: str, fingerprint: str, outputs: dict) -> None:
    from kfp.local.cache import LocalCache

    record = {"fingerprint": fingerprint, "outputs": LocalCache._serialize_outputs(outputs),
              "output_hashes": {name: content_hash(Path(value.path)) for name, value in _artifacts(outputs).items()}}
    target = run_dir / STEPS_DIR
    target.mkdir(parents=True, exist_ok=True)
    temporary = target / f".{step}.json.tmp"
    temporary.write_text(json.dumps(record, sort_keys=True, default=str), encoding="utf-8")
    temporary.replace(target / f"{step}.json")


def _reusable_outputs(resumed_dir: Path, new_dir: Path, step: str, fingerprint: str) -> tuple[dict | None, str]:
    """RUN's outputs of ``step`` linked into the new run, or None and the reason it must run again."""
    from kfp.local.cache import LocalCache

    record_path = resumed_dir / STEPS_DIR / f"{step}.json"
    if not record_path.is_file():
        return None, f"it did not finish in {resumed_dir.name}"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != fingerprint:
        return None, "its inputs changed"
    relinked = {}
    for name, value in record["outputs"].items():
        if isinstance(value, dict) and value.get("__kfp_artifact__"):
            old = Path(value["uri"])
            if content_hash(old) != record["output_hashes"].get(name):
                return None, f"its output {name} changed since it was written"
            new = new_dir / old.relative_to(resumed_dir)
            _link_or_copy(old, new)
            value = {**value, "uri": str(new)}
        relinked[name] = value
    return LocalCache._deserialize_outputs(relinked), ""


def _artifacts(outputs: dict) -> dict:
    from kfp import dsl

    return {name: value for name, value in outputs.items() if isinstance(value, dsl.Artifact)}


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)
    elif source.exists():
        if target.exists():
            target.unlink()
        link(source, target)
