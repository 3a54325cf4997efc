"""``training.processes: N``: data-parallel training through ``torchrun`` (gloo on CPU, NCCL on GPU).

The parent writes the config (overrides applied) to a temporary file and starts
``torchrun --standalone --nproc-per-node N -m tuneloop.training.worker``; each rank runs the same
loop, takes its share of every global batch, and only rank 0 writes checkpoints and the Model.
A rank that fails writes its tuneloop error to a file the parent turns back into the same error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tuneloop import errors
from tuneloop.config import TuneloopConfig
from tuneloop.errors import ConfigError, TrainingError

ERROR_FILE_ENV = "TUNELOOP_WORKER_ERROR_FILE"


def inside_torchrun() -> bool:
    """True in a rank started by torchrun (or a TrainJob), which trains instead of launching."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def available_slots() -> tuple[int, str]:
    """How many processes this machine can give a device each: GPUs, else CPU cores."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA devices"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU cores (no GPU)"


def check_processes(processes: int) -> None:
    """Raises ConfigError when ``training.processes`` is above the devices or cores available."""
    slots, what = available_slots()
    if processes > slots:
        raise ConfigError(
            f"training.processes {processes} is more than the {slots} {what} on this machine",
            stage="training", field="training.processes",
        )


def launch(config: TuneloopConfig, dataset_path: str | Path, output_dir: str | Path, *, data_fingerprint: str,
           pipeline_run: str, task: str) -> None:
    """Run the training loop in ``config.training.processes`` torchrun ranks and wait for them.

    Raises:
        TuneloopError: the error a rank raised (same class and message).
        TrainingError: torchrun failed without a tuneloop error (a crash, a signal).
    """
    processes = config.training.processes
    with tempfile.TemporaryDirectory(prefix="tuneloop-ddp-") as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(config.to_json(), encoding="utf-8")
        error_file = Path(scratch) / "error.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "tuneloop.training.worker", "--config-json", str(config_file), "--dataset", str(dataset_path),
            "--output", str(output_dir), "--fingerprint", data_fingerprint, "--pipeline-run", pipeline_run,
            "--task", task,
        ]
        env = {**os.environ, ERROR_FILE_ENV: str(error_file), "OMP_NUM_THREADS": str(max(1, _cores() // processes))}
        print(f"finetune: starting {processes} DDP processes through torchrun", flush=True)
        completed = subprocess.run(command, env=env, check=False)
        if completed.returncode != 0:
            raise _worker_error(error_file, completed.returncode)


def _worker_error(error_file: Path, returncode: int) -> Exception:
    if error_file.is_file():
        recorded = json.loads(error_file.read_text(encoding="utf-8"))
        kind = getattr(errors, recorded["type"], TrainingError)
        if isinstance(kind, type) and issubclass(kind, errors.TuneloopError):
            return kind(recorded["message"], stage=recorded.get("stage"), field=recorded.get("field"))
    return TrainingError(f"torchrun exited with code {returncode} before any rank reported an error",
                         stage="training")


def record_worker_error(error: Exception) -> None:
    """Called by a failing rank: the first error wins (other ranks usually fail because of it)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path or Path(path).exists():
        return
    if isinstance(error, errors.TuneloopError):
        recorded = {"type": type(error).__name__, "message": error.message, "stage": error.stage, "field": error.field}
    else:
        recorded = {"type": "TrainingError", "message": str(error), "stage": "training"}
    Path(path).write_text(json.dumps(recorded), encoding="utf-8")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_rank_zero() -> bool:
    """True in the process that writes (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0
