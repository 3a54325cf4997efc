"""Small helpers every compression module uses: the stage name, logging, file sizes, error lines."""

from __future__ import annotations

import re
from pathlib import Path

STAGE = "compression"


def log(message: str) -> None:
    """One progress line of the compress step."""
    print(f"compress: {message}", flush=True)


def file_size(path: str | Path) -> int:
    """Bytes of one file."""
    return Path(path).stat().st_size


def first_line(error: BaseException) -> str:
    """The line of an error message that says what went wrong (the exporter's own summary line
    when it wrote one), without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), lines[0])
    return summary[:400]
