"""Moving Model directories and datasets between a pod's disk and an object store (fsspec).

A ``TrainJob`` runs in pods of its own: ``finetune`` uploads the dataset for it and reads the Model
back from the prefix the job's rank 0 uploaded it to.
"""

from __future__ import annotations

from pathlib import Path

import fsspec

from tuneloop.config import is_uri
from tuneloop.errors import ServiceUnavailableError, TrainingError


def local_copy(source: str, target: Path) -> Path:
    """``source`` itself when it is a local path, else a download of it to ``target``."""
    if not is_uri(source):
        return Path(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = fsspec.core.url_to_fs(source)
    _call(lambda: fs.get_file(path, str(target)), "download", source)
    return target


def upload_file(source: str | Path, target_uri: str) -> None:
    """Copy one local file to a URI (or a local path)."""
    fs, path = fsspec.core.url_to_fs(target_uri)
    if not is_uri(target_uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    _call(lambda: fs.put_file(str(source), path), "upload", target_uri)


def upload_directory(source: str | Path, target_uri: str) -> None:
    """Copy every file of a local directory under a URI prefix; ``_COMPLETE`` is written last."""
    source = Path(source)
    files = sorted(path for path in source.rglob("*") if path.is_file())
    for path in files:
        upload_file(path, f"{target_uri.rstrip('/')}/{path.relative_to(source).as_posix()}")
    fs, prefix = fsspec.core.url_to_fs(target_uri)
    _call(lambda: fs.pipe_file(f"{prefix.rstrip('/')}/_COMPLETE", b"ok"), "upload", target_uri)


def download_directory(source_uri: str, target: str | Path) -> None:
    """Copy a complete uploaded directory (one with ``_COMPLETE``) into ``target``.

    Raises:
        TrainingError: the prefix holds no complete upload.
    """
    fs, prefix = fsspec.core.url_to_fs(source_uri)
    prefix = prefix.rstrip("/")
    if not _call(lambda: fs.exists(f"{prefix}/_COMPLETE"), "read", source_uri):
        raise TrainingError(f"no complete model under {source_uri} (the job wrote no _COMPLETE marker)",
                            stage="training", path=source_uri)
    target = Path(target)
    for remote in _call(lambda: fs.find(prefix), "list", source_uri):
        relative = remote[len(prefix) + 1:]
        if relative == "_COMPLETE":
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        _call(lambda: fs.get_file(remote, str(target / relative)), "download", source_uri)


def _call(action, what: str, uri: str):
    try:
        return action()
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as error:
        raise ServiceUnavailableError(f"cannot {what} {uri}: {error}", service="object store", uri=uri) from error
