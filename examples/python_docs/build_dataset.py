"""Build a 6-class text data set from the docstrings of Python's standard library.

Each row is the docstring of one public function, class or method; its label is the domain of the
module it comes from (``networking``, ``text``, ``files``, ``concurrency``, ``numbers``,
``tooling``). Docstrings run from one line to several thousand characters, and the domains share
vocabulary (a file, a stream, a parser), so neither TF-IDF nor a fine-tuned MiniLM reaches 0.9
macro-F1: it is the kind of task `tuneloop init` must get right without absolute thresholds.

    .venv/bin/python examples/python_docs/build_dataset.py --output /tmp/python_docs.csv
    .venv/bin/tuneloop init --data /tmp/python_docs.csv --text-column text --label-column domain --dir docs
    .venv/bin/tuneloop run --local --config docs/tuneloop.yaml

The rows depend on the Python version and its build (3.11 here gives 3,455 distinct docstrings).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import pkgutil
import random
from collections import Counter
from pathlib import Path
from types import ModuleType

DOMAINS = {
    "networking": ["socket", "ssl", "http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "xmlrpc",
                   "ipaddress", "socketserver", "wsgiref", "mailbox", "mimetypes"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "xml", "csv", "json", "tomllib",
             "gettext", "locale", "shlex", "tokenize", "configparser"],
    "files": ["os", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "stat", "filecmp", "zipfile", "tarfile", "gzip",
              "bz2", "lzma", "io", "fileinput", "zipimport"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "concurrent", "queue", "subprocess", "sched",
                    "selectors", "signal", "contextvars"],
    "numbers": ["math", "statistics", "decimal", "fractions", "random", "numbers", "cmath", "array", "bisect", "heapq",
                "operator", "itertools", "functools"],
    "tooling": ["unittest", "doctest", "pdb", "trace", "traceback", "inspect", "dis", "ast", "logging", "argparse",
                "timeit", "cProfile", "pstats", "warnings", "importlib"],
}
MIN_CHARACTERS = 40
"""Shorter docstrings ("Return self.") say nothing about their domain."""


def modules_of(name: str) -> list[ModuleType]:
    """The module ``name`` and, for a package, its importable submodules (tests and IDLE left out)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return []
    found = [module]
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{name}."):
        if "test" in info.name or "idle" in info.name:
            continue
        try:
            found.append(importlib.import_module(info.name))
        except Exception:  # a platform-specific submodule (Windows, a missing C library)
            continue
    return found


def collect(owner: object, domain: str, roots: set[str], seen: set[str], rows: list[dict], depth: int = 0) -> None:
    """Docstrings of the public routines and classes of ``owner``, and of the methods of its own classes."""
    for name, member in inspect.getmembers(owner):
        public = not name.startswith("_") or name == "__init__"  # a constructor's docstring is its class's
        if not public or not (inspect.isroutine(member) or inspect.isclass(member)):
            continue
        doc = inspect.getdoc(member)
        if doc and len(doc) >= MIN_CHARACTERS and doc not in seen:
            seen.add(doc)
            rows.append({"text": doc, "domain": domain})
        home = (getattr(member, "__module__", "") or "").split(".")[0]
        if inspect.isclass(member) and home in roots and depth < 2:
            collect(member, domain, roots, seen, rows, depth + 1)


def build_rows(seed: int) -> list[dict[str, str]]:
    """Every distinct docstring of the domains' modules, labelled, in an order shuffled with ``seed``."""
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for domain, names in DOMAINS.items():
        for name in names:
            for module in modules_of(name):
                collect(module, domain, set(names), seen, rows)
    random.Random(seed).shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="CSV to write (text, domain)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = build_rows(args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "domain"])
        writer.writeheader()
        writer.writerows(rows)
    counts = Counter(row["domain"] for row in rows)
    print(f"wrote {len(rows)} rows to {args.output}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
