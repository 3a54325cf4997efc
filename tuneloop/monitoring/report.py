"""The drift report on disk: the :class:`DriftReport` handle, its JSON summary and its HTML page
(our summary on top of Evidently's widgets)."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import TuneloopConfig
from tuneloop.errors import DataError
from tuneloop.monitoring.common import (
    DRIFT,
    INSUFFICIENT_DATA,
    NO_DRIFT,
    STAGE,
    VERDICT_LINES,
    _jsonable,
)

# --------------------------------------------------------------------------------------------
# The drift report


@dataclass
class DriftReport:
    """The outcome of :func:`check_drift`: verdict, the JSON summary, where the files are."""

    verdict: str
    summary: dict
    html_path: Path
    json_path: Path

    @property
    def drift(self) -> bool:
        return self.verdict == DRIFT

    @property
    def report_id(self) -> str:
        return self.summary["report_id"]

    @property
    def location(self) -> str:
        return self.summary.get("report_uri") or str(self.html_path)

    @property
    def verdict_line(self) -> str:
        return VERDICT_LINES[self.verdict]

    def update(self, **sections: Any) -> None:
        """Add sections (``retraining``, ``alert``) to the summary and rewrite the JSON file."""
        self.summary.update(sections)
        write_json(self.json_path, self.summary)


def reports_dir(config: TuneloopConfig) -> Path:
    """Where :func:`check_drift` writes when not given paths: ``<state_dir>/monitoring/reports``."""
    return Path(config.state_dir) / "monitoring" / "reports"


# --------------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, summary: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(summary), indent=2, default=str), encoding="utf-8")


def read_report(path: str | Path) -> dict:
    """Read a report JSON written by :func:`check_drift`.

    Raises:
        DataError: missing or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"drift report {path} is not readable JSON: {error}", stage=STAGE, path=str(path)) from error


def render_html(summary: dict, drift_snapshot=None, quality_snapshot=None) -> str:
    """One self-contained HTML page: the verdict summary on top of Evidently's drift report (and
    its classification report on feedback labels, when there is one)."""
    header = _summary_html(summary)
    if drift_snapshot is None:
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tuneloop drift report "
                f"{html.escape(summary['report_id'])}</title></head><body>{header}</body></html>")
    body = _evidently_html(drift_snapshot, quality_snapshot)
    match = re.search(r"<body[^>]*>", body)
    if match is None:
        return header + body
    return body[: match.end()] + header + body[match.end():]


def _evidently_html(drift_snapshot, quality_snapshot) -> str:
    """Evidently's widgets of both snapshots in one page (its standalone renderer)."""
    try:
        from evidently.core.metric_types import render_widgets
        from evidently.legacy.renderers.html_widgets import group_widget

        widgets = [group_widget(title="Data and prediction drift", widgets=drift_snapshot._widgets)]
        widgets += list(drift_snapshot._tests_widgets)
        if quality_snapshot is not None:
            widgets.append(group_widget(title="Classification quality on feedback labels",
                                        widgets=quality_snapshot._widgets))
        return render_widgets(widgets, as_iframe=False)
    except Exception:  # Evidently internals moved: its own page of the drift report only
        return drift_snapshot.get_html_str(as_iframe=False)


def _summary_html(summary: dict) -> str:
    esc = lambda value: html.escape(str(value))  # noqa: E731
    colour = {DRIFT: "#b3261e", NO_DRIFT: "#1e7b34", INSUFFICIENT_DATA: "#8a6d00"}[summary["verdict"]]
    rows = [
        ("model", f"{summary['model_name']} version {summary['model_version']}"),
        ("window", f"{summary['window']['description']} (until {summary['window']['end']})"),
        ("records", f"{summary['rows']['current']} current (min {summary['rows']['min_rows']}), "
                    f"{summary['rows']['reference']} reference"),
        ("prediction log", summary["log"]["uri"]),
    ]
    if summary.get("reference"):
        reference = summary["reference"]
        rows.append(("reference", f"{reference['uri']} (predictions: {reference['predictions']})"))
    others = summary["log"]["other_versions"]
    if others:
        rows.append(("left out", ", ".join(f"{n} records of version {v}" for v, n in sorted(others.items()))))
    table = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{esc(k)}</th><td>{esc(v)}</td></tr>"
                    for k, v in rows)
    reasons = "".join(f"<li>{esc(reason)}</li>" for reason in summary["reasons"])
    parts = [
        "<section id='tuneloop-summary' style='font-family:sans-serif;margin:1em 2em;padding:1em;"
        "border:1px solid #ccc;border-radius:6px'>",
        f"<h1 style='margin-top:0'>tuneloop drift report <small>{esc(summary['report_id'])}</small></h1>",
        f"<p style='font-size:1.3em;color:{colour};font-weight:bold'>"
        f"{esc(VERDICT_LINES[summary['verdict']])}</p><ul>{reasons}</ul><table>{table}</table>",
    ]
    if summary["columns"]:
        cells = "".join(
            f"<tr><td>{esc(c['column'])}</td><td>{esc(c['kind'])}</td><td>{esc(c['method'])}</td>"
            f"<td>{c['score']:.4g}</td><td>{esc(c['threshold'])}</td><td>{esc(_tier(c))}</td>"
            f"<td>{esc(_window_scores(c))}</td>"
            + ("<td style='color:#b3261e'>drift</td></tr>" if c["drifted"] else
               "<td style='color:#1e7b34'>ok</td></tr>")
            for c in summary["columns"])
        parts.append("<h2>Columns</h2><table border='1' cellpadding='4' style='border-collapse:collapse'>"
                     "<tr><th>column</th><th>kind</th><th>method</th><th>score</th><th>threshold</th>"
                     "<th>decided on</th><th>whole window: JS / PSI / Wasserstein</th>"
                     f"<th>drift</th></tr>{cells}</table>")
    parts.append(_embedding_html(summary.get("embedding")))
    quality = summary.get("quality")
    if quality and "macro_f1" in quality:
        parts.append(f"<h2>Quality on feedback labels</h2><p>{quality['rows']} labelled records: accuracy "
                     f"{quality['accuracy']:.4f}, macro-F1 {quality['macro_f1']:.4f}"
                     + (f" (version's test macro-F1 {quality['version_test_macro_f1']:.4f})"
                        if "version_test_macro_f1" in quality else "") + "</p>")
    skipped = summary["log"]["files_skipped"] + ((quality or {}).get("files_skipped") or [])
    if skipped:
        items = "".join(f"<li><code>{esc(s['path'])}</code>: {esc(s['reason'])}</li>" for s in skipped)
        parts.append(f"<h2>Skipped files ({len(skipped)})</h2><ul>{items}</ul>")
    parts.append("</section>")
    return "".join(parts)


def _tier(column: dict) -> str:
    if column.get("tier") == "window":
        return f"whole window ({column['window_rows']} records)"
    return "sample (Evidently)"


def _window_scores(column: dict) -> str:
    scores = column.get("window_scores") or {}
    return " / ".join(f"{scores[name]:.3g}" if name in scores else "-"
                      for name in ("jensenshannon", "psi", "wasserstein")) if scores else ""


def _embedding_html(embedding: dict | None) -> str:
    """The embedding signal: score against its calibrated threshold, and what drives the drift."""
    esc = lambda value: html.escape(str(value))  # noqa: E731
    if not embedding:
        return ""
    if "score" not in embedding:
        return f"<h2>Sentence embeddings</h2><p>not computed: {esc(embedding.get('skipped'))}</p>"
    verdict = "drift" if embedding["drifted"] else "ok"
    parts = [f"<h2>Sentence embeddings</h2><p>{esc(embedding['method'])} on {esc(embedding.get('model', ''))}: "
             f"score {embedding['score']:.3g}, threshold {embedding['threshold']:.3g} (calibrated to "
             f"{embedding['false_alarm_rate']:.1%} false alarms over {embedding['permutations']} reference "
             f"permutations; {embedding['current_rows']} current, {embedding['reference_rows']} reference texts): "
             f"<b>{verdict}</b></p>"]
    drivers = embedding.get("drivers") or {}
    if drivers.get("ngrams"):
        items = "".join(f"<li><code>{esc(g['ngram'])}</code>: {g['driving_share']:.0%} of the driving texts, "
                        f"{g['reference_share']:.2%} of the reference</li>" for g in drivers["ngrams"])
        parts.append(f"<h3>What drives it: n-grams</h3><ul>{items}</ul>")
    if drivers.get("examples"):
        items = "".join(f"<li>{esc(e['text'])}</li>" for e in drivers["examples"])
        parts.append(f"<h3>Example texts of the current window</h3><ul>{items}</ul>")
    return "".join(parts)
