"""Checks of the frame that is trained: the point-in-time frame ``retrieve_features`` hands ``finetune``.

``validate_data`` checks the raw sources joined to each id's latest text; training uses Feast's
point-in-time frame, whose texts are those known at each label's time. :func:`run` validates that
frame itself and gives the fingerprint the registry records as lineage:

- the Great Expectations suite of :mod:`tuneloop.validation` (:func:`~tuneloop.validation.validate_frame`),
  run on the trained frame;
- **near-duplicates across splits**: a validation or test row whose normalised text (NFKC, lower
  case, every run of non-alphanumerics one space) has a Jaccard similarity of at least
  ``validation.near_duplicate_similarity`` with a train row's, over character 5-gram sets. Candidates
  come from MinHash LSH (``datasketch``, 128 permutations); each is confirmed on the exact sets. The
  check fails when more than ``validation.max_near_duplicate_share`` of the validation and test rows
  have one, and names example pairs;
- **relabelled texts**: an id, or a normalised text, that carries two different labels (over time,
  or in two rows) is reported with its labels; a statistic, never a failure.

It writes a JSON result and an HTML report (also on failure) and raises
:class:`~tuneloop.errors.DataValidationError` listing every failed check.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import DATASET_FILE, SPLIT_COLUMN, fingerprint_frame, read_dataset, require_columns
from tuneloop.errors import DataValidationError

STAGE = "validation"
SHINGLE = 5
NUM_PERM = 128
MAX_EXAMPLES = 10
_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


@dataclass(frozen=True)
class FrameCheckSummary:
    """What :func:`run` found on the trained frame."""

    rows: int
    fingerprint: str
    success: bool
    near_duplicate_share: float
    relabelled: int


def normalise(text: object) -> str:
    """The text as the near-duplicate check compares it: NFKC, lower case, non-alphanumerics as one space."""
    value = "" if text is None or (isinstance(text, float) and pd.isna(text)) else str(text)
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", value).lower()).strip()


def shingles(text: str) -> set[str]:
    """Character ``SHINGLE``-grams of a normalised text (the whole text when shorter)."""
    if len(text) <= SHINGLE:
        return {text}
    return {text[i:i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


def _jaccard(first: set[str], second: set[str]) -> float:
    return len(first & second) / len(first | second) if first or second else 1.0


def near_duplicates(frame: pd.DataFrame, config: TuneloopConfig) -> list[dict]:
    """Validation and test rows with a near-duplicate in train: one entry per such row, with its best
    train match (ids, splits, similarity, both texts)."""
    from datasketch import MinHash, MinHashLSH

    data, threshold = config.data, config.validation.near_duplicate_similarity
    normal = frame[data.text_column].map(normalise)
    sets = [shingles(text) for text in normal]
    hashes = MinHash.bulk([[s.encode("utf-8") for s in shingle_set] for shingle_set in sets], num_perm=NUM_PERM)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    splits = frame[SPLIT_COLUMN].to_numpy()
    for row in range(len(frame)):
        if splits[row] == "train":
            lsh.insert(row, hashes[row], check_duplication=False)
    found = []
    for row in range(len(frame)):
        if splits[row] == "train":
            continue
        best, score = None, 0.0
        for candidate in lsh.query(hashes[row]):
            similarity = _jaccard(sets[row], sets[candidate])
            if similarity >= threshold and similarity > score:
                best, score = candidate, similarity
        if best is not None:
            found.append({"id": str(frame[data.id_column].iat[row]), "split": str(splits[row]),
                          "train_id": str(frame[data.id_column].iat[best]), "similarity": round(score, 4),
                          "text": str(frame[data.text_column].iat[row])[:120],
                          "train_text": str(frame[data.text_column].iat[best])[:120]})
    return found


def relabelled(frame: pd.DataFrame, config: TuneloopConfig) -> list[dict]:
    """Ids and normalised texts that carry more than one label."""
    data = config.data
    labels = frame[data.label_column].astype(str)
    found = []
    for key, values in ((data.id_column, frame[data.id_column].astype(str)),
                        ("text", frame[data.text_column].map(normalise))):
        grouped = labels.groupby(values.to_numpy()).unique()
        for value, distinct in grouped[grouped.map(len) > 1].items():
            if key == "text" and not value:
                continue
            found.append({"by": "id" if key == data.id_column else "text", "value": str(value)[:120],
                          "labels": sorted(map(str, distinct))})
    return found


def _near_duplicate_check(frame: pd.DataFrame, duplicates: list[dict], config: TuneloopConfig) -> dict:
    evaluated = int((frame[SPLIT_COLUMN] != "train").sum())
    share = len(duplicates) / evaluated if evaluated else 0.0
    allowed = config.validation.max_near_duplicate_share
    ok = share <= allowed
    failure = None if ok else (
        f"{share:.1%} of validation and test rows ({len(duplicates)} of {evaluated}) have a near-duplicate in the "
        f"train split (Jaccard >= {config.validation.near_duplicate_similarity:g}); "
        f"validation.max_near_duplicate_share allows {allowed:.1%}; e.g. "
        + "; ".join(f"{d['split']} {d['id']} ~ train {d['train_id']}" for d in duplicates[:3]))
    return {"reason": "at most validation.max_near_duplicate_share of held-out rows near-duplicate a train row",
            "expectation": "tuneloop_near_duplicates_across_splits", "column": config.data.text_column,
            "success": ok, "observed": round(share, 6), "examples": duplicates[:MAX_EXAMPLES], "failure": failure,
            "expected": {"max_near_duplicate_share": allowed,
                         "near_duplicate_similarity": config.validation.near_duplicate_similarity}}


def load_trained_frame(dataset_path: str | Path) -> pd.DataFrame:
    """The Dataset artifact ``retrieve_features`` wrote (a directory holding ``dataset.parquet``, or the file)."""
    path = Path(dataset_path)
    return read_dataset(path / DATASET_FILE if path.is_dir() else path)


def run(config: TuneloopConfig, dataset_path: str | Path, report_html: str | Path,
        result_json: str | Path) -> FrameCheckSummary:
    """Validate the trained frame; write ``result_json`` and ``report_html`` (always).

    Raises:
        DataError: the Dataset artifact is missing, unreadable or lacks a required column.
        DataValidationError: a check failed; ``failures`` has one line for each.
    """
    from tuneloop import validation

    data = config.data
    frame = load_trained_frame(dataset_path)
    require_columns(frame, [data.id_column, data.text_column, data.label_column, SPLIT_COLUMN],
                    path=str(dataset_path), what="trained frame")
    print(f"[{STAGE}] trained frame: {len(frame)} rows; Great Expectations suite, near-duplicates, relabelled texts",
          flush=True)
    checks = [asdict(check) for check in validation.validate_frame(frame, config)]
    duplicates = near_duplicates(frame, config)
    checks.append(_near_duplicate_check(frame, duplicates, config))
    relabels = relabelled(frame, config)
    failures = [check["failure"] or check["reason"] for check in checks if not check["success"]]
    fingerprint = fingerprint_frame(frame)
    share = checks[-1]["observed"]
    result = {"success": not failures, "rows": len(frame), "fingerprint": fingerprint, "frame": str(dataset_path),
              "splits": {str(k): int(v) for k, v in frame[SPLIT_COLUMN].value_counts().items()},
              "expectations": checks, "near_duplicates": {"rows": len(duplicates), "share": share,
                                                          "examples": duplicates[:MAX_EXAMPLES]},
              "relabelled": {"count": len(relabels), "examples": relabels[:MAX_EXAMPLES]}}
    _write(result, report_html, result_json)
    print(f"[{STAGE}] {len(checks) - len(failures)} of {len(checks)} checks passed; near-duplicate share "
          f"{share:.2%}; {len(relabels)} relabelled ids or texts; fingerprint {fingerprint}", flush=True)
    if failures:
        raise DataValidationError(f"the trained frame {dataset_path} failed {len(failures)} check(s)",
                                  failures=failures, stage=STAGE, path=str(dataset_path))
    return FrameCheckSummary(rows=len(frame), fingerprint=fingerprint, success=True,
                             near_duplicate_share=share, relabelled=len(relabels))


def _write(result: dict, report_html: str | Path, result_json: str | Path) -> None:
    for path in (Path(report_html), Path(result_json)):
        path.parent.mkdir(parents=True, exist_ok=True)
    Path(result_json).write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    Path(report_html).write_text(render_html(result), encoding="utf-8")


def render_html(result: dict) -> str:
    """The report of the trained frame: the checks, then the near-duplicate and relabelled examples."""
    esc = lambda value: html.escape(str(value))  # noqa: E731
    rows = "".join(
        f"<tr><td>{esc(c['reason'])}</td><td>{'passed' if c['success'] else 'FAILED'}</td>"
        f"<td>{esc(c['observed'])}</td><td>{esc(c.get('failure') or '')}</td></tr>" for c in result["expectations"])
    pairs = "".join(f"<tr><td>{esc(d['split'])} {esc(d['id'])}</td><td>{esc(d['text'])}</td>"
                    f"<td>train {esc(d['train_id'])}</td><td>{esc(d['train_text'])}</td><td>{d['similarity']}</td></tr>"
                    for d in result["near_duplicates"]["examples"])
    relabels = "".join(f"<li>{esc(r['by'])} <code>{esc(r['value'])}</code>: {esc(', '.join(r['labels']))}</li>"
                       for r in result["relabelled"]["examples"])
    verdict = "passed" if result["success"] else "failed"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tuneloop trained-frame validation</title></head>"
        f"<body style='font-family:sans-serif'><h1>Trained frame validation {verdict}</h1>"
        f"<p>{result['rows']} rows, splits {esc(result['splits'])}, fingerprint <code>{esc(result['fingerprint'])}"
        f"</code></p><table border='1' cellpadding='4'><tr><th>check</th><th>result</th><th>observed</th>"
        f"<th>why</th></tr>{rows}</table><h2>Near-duplicates across splits ({result['near_duplicates']['rows']}, "
        f"{result['near_duplicates']['share']:.2%})</h2><table border='1' cellpadding='4'>{pairs}</table>"
        f"<h2>Relabelled ids and texts ({result['relabelled']['count']})</h2><ul>{relabels}</ul></body></html>")
