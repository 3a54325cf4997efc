"""The metadata file that travels with every model directory: ``tuneloop.json``.

A Model directory holds a Hugging Face checkpoint (safetensors, tokenizer, config) plus
``tuneloop.json``: label names in order, max sequence length, base model, data fingerprint,
training config and metrics. A Compressed Model directory holds ``model.onnx`` (or ``model.plan``),
the tokenizer, and ``tuneloop.json`` with the runtime, precision and measured changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.errors import ModelError

METADATA_FILE = "tuneloop.json"


def write_metadata(directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``tuneloop.json`` into ``directory`` (created if needed) and return its path."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    path = target / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return path


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Read ``tuneloop.json`` from a model directory.

    Raises:
        ModelError: the directory or file is missing or not valid JSON.
    """
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise ModelError(f"model directory {directory} has no {METADATA_FILE}", path=str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is not valid JSON: {error}", path=str(path)) from error
