"""Build a multi-class text data set from the Debian archive's package descriptions.

Each row is one binary package of Debian 12 (bookworm): its text is the synopsis and long
description (or the one-line synopsis alone, ``--synopsis-only``), its label is the archive section
(``net``, ``science``, ...). Sections overlap in meaning (a network monitor can sit in ``net`` or
``admin``), so no model reaches 0.9 macro-F1, and on the short synopses a fine-tuned MiniLM-L6 is
about as good as TF-IDF + logistic regression: the data set on which the gate must say "not shown"
rather than bless a model that is no better than the baseline.

The sources are apt's own lists, which `apt-get update` downloads from the Debian mirror::

    apt-get -o Acquire::Languages=en update     # the long descriptions (Translation-en)
    python examples/debian_sections/build_dataset.py --output /tmp/debian_sections.csv

Packages whose synopsis names a build variant (``(data files)``, ``- debug symbols``,
``- documentation``) are dropped: they repeat the description of their main package.
"""

from __future__ import annotations

import argparse
import csv
import glob
import random
import subprocess
from collections import defaultdict
from pathlib import Path

APT_LISTS = Path("/var/lib/apt/lists")
DEFAULT_SECTIONS = ("admin", "games", "graphics", "net", "science", "sound")
VARIANT_MARKERS = ("data files", "data file", "debug symbols", "documentation", "transitional",
                   "dummy package", "common files", "arch-independent", "development files")


def read_stanzas(pattern: str) -> list[dict[str, str]]:
    """The RFC 822 stanzas of every apt list matching ``pattern`` (lz4-compressed or plain)."""
    stanzas: list[dict[str, str]] = []
    paths = sorted(glob.glob(str(APT_LISTS / pattern)))
    if not paths:
        raise SystemExit(f"no apt list matches {APT_LISTS / pattern}: run `apt-get -o Acquire::Languages=en update`")
    for path in paths:
        raw = subprocess.run(["lz4cat", path], check=True, capture_output=True).stdout if path.endswith(".lz4") \
            else Path(path).read_bytes()
        stanza: dict[str, str] = {}
        field = None
        for line in raw.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                if stanza:
                    stanzas.append(stanza)
                stanza, field = {}, None
            elif line[0] in " \t" and field:
                stanza[field] += "\n" + line[1:]
            else:
                field, _, value = line.partition(":")
                stanza[field] = value.strip()
        if stanza:
            stanzas.append(stanza)
    return stanzas


def description_text(description: str) -> str:
    """Synopsis and long description as prose: apt's ``.`` paragraph lines become blank lines."""
    lines = [("" if line.strip() == "." else line.strip()) for line in description.splitlines()]
    return "\n".join(lines).strip()


def build_rows(sections: tuple[str, ...], per_section: int, seed: int, *, synopsis_only: bool = False
               ) -> list[dict[str, str]]:
    """At most ``per_section`` packages of each section with a long description, sampled with ``seed``;
    the text is the synopsis alone (one short line, like a question set) with ``synopsis_only``."""
    long_descriptions = {s["Description-md5"]: s["Description-en"]
                         for s in read_stanzas("*_i18n_Translation-en*") if "Description-md5" in s}
    by_section: dict[str, dict[str, str]] = defaultdict(dict)
    for package in read_stanzas("*_binary-amd64_Packages*"):
        section = package.get("Section", "").rsplit("/", 1)[-1]
        description = long_descriptions.get(package.get("Description-md5", ""))
        if section not in sections or not description:
            continue
        synopsis = description.splitlines()[0].lower()
        if any(marker in synopsis for marker in VARIANT_MARKERS):
            continue
        text = description.splitlines()[0].strip() if synopsis_only else description_text(description)
        by_section[section][package["Package"]] = text
    rng = random.Random(seed)
    rows = []
    for section in sections:
        names = sorted(by_section[section])
        rng.shuffle(names)
        rows += [{"package": name, "text": by_section[section][name], "section": section}
                 for name in names[:per_section]]
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="CSV to write (package, text, section)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help="comma-separated Debian sections")
    parser.add_argument("--per-section", type=int, default=700, help="most packages kept per section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synopsis-only", action="store_true", help="the one-line synopsis as text (short texts)")
    args = parser.parse_args()
    rows = build_rows(tuple(args.sections.split(",")), args.per_section, args.seed,
                      synopsis_only=args.synopsis_only)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["package", "text", "section"])
        writer.writeheader()
        writer.writerows(rows)
    counts = defaultdict(int)
    for row in rows:
        counts[row["section"]] += 1
    print(f"wrote {len(rows)} rows to {args.output}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
