"""Training checkpoints: safetensors + JSON under ``<checkpoint_uri>/<run>/<task>/step-NNNNNNNN/``.

A checkpoint holds the model weights, the best epoch's weights so far, the optimizer's tensors
(safetensors) and its hyperparameters, the scheduler, grad scaler, RNG and loop position (JSON and
safetensors). Nothing is pickled and nothing is read with ``torch.load``.

Completeness: the files are written first and ``manifest.json`` (every file's SHA-256) last, so a
checkpoint without a manifest is partial and one whose files do not match it is corrupt; both are
skipped with a logged reason. A complete checkpoint written for another model or config is refused
by name: resuming it would silently train something else.

The root is a local directory or any fsspec URI (``s3://bucket/prefix``, credentials from the
environment), so a retried pod on another node finds its predecessor's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file, save_file

from tuneloop.errors import ServiceUnavailableError, TrainingError

MANIFEST = "manifest.json"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def run_key(name: str) -> str:
    """A path segment for a pipeline run or task name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


@dataclass
class Checkpoint:
    """A verified checkpoint, downloaded to a local directory."""

    uri: str
    step: int
    directory: Path

    def state(self) -> dict[str, Any]:
        return json.loads((self.directory / STATE).read_text(encoding="utf-8"))

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.directory / f"{name}.safetensors")

    def has(self, name: str) -> bool:
        return (self.directory / f"{name}.safetensors").is_file()


class CheckpointStore:
    """The checkpoints of one pipeline run's task under a local or object-store root."""

    def __init__(self, root_uri: str, run: str, task: str, *, keep: int = 2, log=print) -> None:
        self.fs, root = fsspec.core.url_to_fs(str(root_uri))
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.prefix = f"{root.rstrip('/')}/{run_key(run)}/{run_key(task)}"
        self.keep = keep
        self._log = log

    def uri(self, path: str) -> str:
        return path if self.protocol in ("file", "local") else f"{self.protocol}://{path}"

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> str:
        """Write one complete checkpoint (manifest last) and drop the oldest beyond ``keep``."""
        target = f"{self.prefix}/step-{step:08d}"
        with tempfile.TemporaryDirectory(prefix="tuneloop-ckpt-") as scratch:
            local = Path(scratch)
            for name, values in tensors.items():
                save_file({key: value.detach().cpu().contiguous() for key, value in values.items()},
                          local / f"{name}.safetensors")
            (local / STATE).write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
            files = {path.name: _sha256(path) for path in sorted(local.iterdir())}
            (local / MANIFEST).write_text(json.dumps({"step": step, "files": files}), encoding="utf-8")
            self._io(lambda: self._upload(local, target, [*files, MANIFEST]), "write checkpoint", target)
        self._prune()
        return self.uri(target)

    def latest(self, identity: dict[str, Any]) -> Checkpoint | None:
        """The newest complete checkpoint, downloaded and verified; None when there is none.

        Raises:
            TrainingError: the newest complete checkpoint was written for another model or config.
        """
        for step, path in sorted(self._steps(), reverse=True):
            checkpoint = self._download_verified(step, path)
            if checkpoint is None:
                continue
            saved = checkpoint.state().get("identity", {})
            if saved != identity:
                differences = [f"{key}: {saved.get(key)!r} there, {identity.get(key)!r} here"
                               for key in sorted(set(saved) | set(identity)) if saved.get(key) != identity.get(key)]
                raise TrainingError(
                    f"checkpoint {checkpoint.uri} was written for another model or config "
                    f"({'; '.join(differences[:3])}); refusing to resume from it: use another run name or "
                    f"remove {self.uri(self.prefix)}",
                    stage="training", path=checkpoint.uri,
                )
            return checkpoint
        return None

    def clear(self) -> None:
        """Remove every checkpoint of this run and task (its model is safely written)."""
        try:
            self._io(lambda: self.fs.rm(self.prefix, recursive=True), "remove checkpoints", self.prefix)
        except FileNotFoundError:
            pass

    def _steps(self) -> list[tuple[int, str]]:
        try:
            entries = self._io(lambda: self.fs.ls(self.prefix, detail=False), "list checkpoints", self.prefix)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append((int(match.group(1)), entry.rstrip("/")))
        return steps

    def _download_verified(self, step: int, path: str) -> Checkpoint | None:
        uri = self.uri(path)
        scratch = Path(tempfile.mkdtemp(prefix="tuneloop-resume-"))
        try:
            self._io(lambda: self.fs.get_file(f"{path}/{MANIFEST}", str(scratch / MANIFEST)), "read checkpoint", path)
        except FileNotFoundError:
            self._log(f"finetune: skipping checkpoint {uri}: partial (no {MANIFEST}, the writer was interrupted)")
            return None
        try:
            files = json.loads((scratch / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError) as error:
            self._log(f"finetune: skipping checkpoint {uri}: corrupt {MANIFEST} ({error})")
            return None
        for name, digest in files.items():
            try:
                self._io(lambda: self.fs.get_file(f"{path}/{name}", str(scratch / name)), "read checkpoint", path)
            except FileNotFoundError:
                self._log(f"finetune: skipping checkpoint {uri}: {name} is missing")
                return None
            if _sha256(scratch / name) != digest:
                self._log(f"finetune: skipping checkpoint {uri}: {name} does not match its SHA-256 in {MANIFEST}")
                return None
        return Checkpoint(uri, step, scratch)

    def _upload(self, local: Path, target: str, names: list[str]) -> None:
        if self.protocol in ("file", "local"):
            Path(target).mkdir(parents=True, exist_ok=True)
        for name in names:
            self.fs.put_file(str(local / name), f"{target}/{name}")

    def _prune(self) -> None:
        steps = sorted(self._steps(), reverse=True)
        complete = [(step, path) for step, path in steps if self.fs.exists(f"{path}/{MANIFEST}")]
        keep = {path for _, path in complete[: self.keep]}
        newest_kept = complete[min(self.keep, len(complete)) - 1][0] if complete else 0
        for step, path in steps:
            if path not in keep and step <= newest_kept:
                self._io(lambda: self.fs.rm(path, recursive=True), "remove old checkpoint", path)

    def _io(self, action, what: str, path: str):
        try:
            return action()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as error:
            raise ServiceUnavailableError(
                f"cannot {what} at {self.uri(path)}: {error}", service="checkpoint store", uri=self.uri(path)
            ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_payload(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict split into safetensors tensors and JSON (no pickle)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load what :func:`optimizer_payload` wrote back into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
