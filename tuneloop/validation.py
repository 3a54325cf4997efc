"""Data validation: a Great Expectations suite built from the config, every expectation critical.

The examples are the rows of the labels file; each takes its text from the texts file (the latest
text of its id). The joined frame is checked by a GX 1.x suite that reads like a list of reasons:

- schema: required columns exist
- every label has a text
- no empty text (empty, whitespace-only or null texts at most ``max_empty_text_share`` of rows)
- text length bounds (``min_text_length`` .. ``max_text_length``, empty texts left to the rule above;
  without ``max_text_length`` long texts are a reported statistic, ``text_lengths``, not a failure:
  the model truncates to ``training.max_length`` tokens anyway)
- labels from the known set (``data.classes``)
- unique ids
- at least ``min_rows`` rows
- at least ``min_rows_per_class`` rows per class (checked on a second frame of per-class counts)
- at most ``privacy.max_pii_row_share`` of rows contain personal data (when set; the report always
  counts personal data per type, :func:`tuneloop.privacy.pii_summary`, never showing a text)

:func:`run` writes a JSON result and a self-contained HTML report, both even when the data fails,
and raises :class:`~tuneloop.errors.DataValidationError` listing every failed expectation.

Public API: :func:`run` (the stage), :func:`load_labelled_frame`, :func:`class_counts`,
:func:`count_frame`, :func:`validate_frame`, :func:`render_html`, :class:`ValidationSummary`,
:class:`Check`. Great Expectations is imported only when a suite runs.
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import TuneloopConfig
from tuneloop.datasets import fingerprint_frame, read_table, require_columns
from tuneloop.errors import DataError, DataValidationError
from tuneloop.privacy import pii_summary, pii_table_html

STAGE = "validation"
COUNT_COLUMN = "rows"
"""Column of the per-class count frame that the per-class expectation checks."""
CLASS_COLUMN = "class"
MAX_EXAMPLES = 10
"""How many unexpected values or rows a report keeps per expectation."""
_EMPTY_TEXT = r"^\s*$"


@dataclass(frozen=True)
class ValidationSummary:
    """What :func:`run` found: rows validated, rows per known class, data fingerprint, outcome."""

    rows: int
    class_counts: dict[str, int]
    fingerprint: str
    success: bool
    expectations: int


@dataclass(frozen=True)
class Check:
    """One evaluated expectation, explained: ``failure`` is the readable line when it failed."""

    reason: str
    expectation: str
    column: str | None
    success: bool
    observed: Any
    examples: list[Any] = field(default_factory=list)
    failure: str | None = None
    expected: dict[str, Any] = field(default_factory=dict)


def _log(message: str) -> None:
    print(f"[{STAGE}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Reading and joining


def _text_value(value: Any) -> Any:
    return None if _is_missing(value) else str(value)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are values, not missing
        return False


def _read(location: str, columns: list[str], what: str) -> pd.DataFrame:
    """A data file (local path or object-store URI) that must hold ``columns``."""
    frame = read_table(location, what=what)
    require_columns(frame, columns, path=location, what=what)
    return frame


def _latest_texts(texts: pd.DataFrame, config: TuneloopConfig) -> pd.DataFrame:
    """One row per id (its latest text); a null text counts as an empty text."""
    data = config.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        order = pd.to_datetime(texts[data.timestamp_column], utc=True, errors="coerce")
    latest = texts.assign(_order=order).sort_values("_order", kind="stable", na_position="first")
    latest = latest.drop_duplicates(data.id_column, keep="last")
    return pd.DataFrame(
        {
            data.id_column: latest[data.id_column].astype(str),
            data.text_column: [_text_value(v) or "" for v in latest[data.text_column]],
        }
    )


def load_labelled_frame(config: TuneloopConfig) -> pd.DataFrame:
    """The examples to validate: every labels row with the latest text of its id.

    Columns: id, timestamp (the label's), label (as strings), text. A label whose id has no row in
    the texts file keeps a null text; a null text in the texts file becomes ``""`` (an empty text).

    Raises:
        DataError: a file is missing or unreadable, or lacks a required column (named).
    """
    data = config.data
    texts = _read(data.texts, [data.id_column, data.timestamp_column, data.text_column], "texts file")
    labels = _read(data.labels, [data.id_column, data.timestamp_column, data.label_column], "labels file")
    examples = pd.DataFrame(
        {
            data.id_column: labels[data.id_column].astype(str),
            data.timestamp_column: labels[data.timestamp_column],
            data.label_column: labels[data.label_column].astype(str),
        }
    )
    joined = examples.merge(_latest_texts(texts, config), on=data.id_column, how="left", validate="many_to_one")
    joined[data.text_column] = joined[data.text_column].astype(object).where(joined[data.text_column].notna(), None)
    return joined.reset_index(drop=True)


def class_counts(frame: pd.DataFrame, config: TuneloopConfig) -> dict[str, int]:
    """Rows per known class, in ``data.classes`` order, zero for a class with no rows."""
    counts = frame[config.data.label_column].value_counts()
    return {name: int(counts.get(name, 0)) for name in config.data.classes}


# --------------------------------------------------------------------------------------------
# The suite


def _expectations(config: TuneloopConfig, empty_values: list[str]) -> list:
    """The suite on the joined frame, one expectation per reason (``meta["key"]``), all critical."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity
    from great_expectations.expectations.row_conditions import Column

    data, rules = config.data, config.validation
    text, non_empty = data.text_column, Column(data.text_column).is_not_in(empty_values)

    def rule(expectation, key: str, reason: str, **kwargs):
        return expectation(meta={"key": key}, description=reason, severity=FailureSeverity.CRITICAL, **kwargs)

    columns = [data.id_column, data.timestamp_column, data.text_column, data.label_column]
    return [
        rule(gxe.ExpectTableColumnsToMatchSet, "schema", "schema: required columns exist",
             column_set=columns, exact_match=False),
        rule(gxe.ExpectColumnValuesToNotBeNull, "has_text", "every label has a text", column=text),
        rule(gxe.ExpectColumnValuesToNotMatchRegex, "empty_text", "no empty text", column=text,
             regex=_EMPTY_TEXT, mostly=1.0 - rules.max_empty_text_share),
        rule(gxe.ExpectColumnValueLengthsToBeBetween, "text_length", "text length bounds", column=text,
             min_value=rules.min_text_length, max_value=rules.max_text_length,
             **({"row_condition": non_empty} if empty_values else {})),
        rule(gxe.ExpectColumnValuesToBeInSet, "known_labels", "labels from the known set",
             column=data.label_column, value_set=list(data.classes)),
        rule(gxe.ExpectColumnValuesToBeUnique, "unique_ids", "unique ids", column=data.id_column),
        rule(gxe.ExpectTableRowCountToBeBetween, "min_rows", f"at least {rules.min_rows} rows",
             min_value=rules.min_rows),
    ]


def _class_expectations(config: TuneloopConfig) -> list:
    """The suite on the per-class count frame: every known class has enough rows."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    minimum = config.validation.min_rows_per_class
    return [
        gxe.ExpectColumnValuesToBeBetween(
            column=COUNT_COLUMN, min_value=minimum, meta={"key": "rows_per_class"},
            description=f"at least {minimum} rows per class", severity=FailureSeverity.CRITICAL,
        )
    ]


def _quiet_context():
    """An ephemeral GX context without progress bars, analytics or chatty logging."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    project = DataContextConfig(
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(),
    )
    return gx.get_context(mode="ephemeral", project_config=project)


def _validate(context, source, name: str, frame: pd.DataFrame, expectations: list, index_column: str):
    """Run one suite on one frame through a pandas dataframe asset; the GX validation result."""
    import great_expectations as gx

    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(f"{name}-all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"tuneloop-{name}", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"tuneloop-{name}", data=batch, suite=suite)
    )
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]}
    return definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)


def count_frame(counts: dict[str, int]) -> pd.DataFrame:
    """The per-class count frame the per-class expectation validates: one row per known class."""
    return pd.DataFrame({CLASS_COLUMN: list(counts), COUNT_COLUMN: list(counts.values())})


def validate_frame(frame: pd.DataFrame, config: TuneloopConfig) -> list[Check]:
    """Validate the joined frame (and its per-class counts) with Great Expectations.

    Returns one :class:`Check` per expectation, in the order of the reasons listed in this module's
    docstring, each explained in words.
    """
    data = config.data
    counts = class_counts(frame, config)
    facts = {"rows": len(frame), "config": config, "class_counts": counts}
    texts = frame[data.text_column].dropna()
    empty_values = sorted(set(texts[texts.str.fullmatch(_EMPTY_TEXT)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = _quiet_context()
        source = context.data_sources.add_pandas("tuneloop")
        results = [
            _validate(context, source, "labelled", frame, _expectations(config, empty_values), data.id_column),
            _validate(context, source, "class_counts", count_frame(counts),
                      _class_expectations(config), CLASS_COLUMN),
        ]
    evaluated = [result for validation in results for result in validation.results]
    evaluated.sort(key=lambda result: list(_EXPLAINERS).index(result.expectation_config.meta["key"]))
    return [_explain(result, facts) for result in evaluated]


# --------------------------------------------------------------------------------------------
# Explaining results


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def _distinct(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _clip(value: Any, width: int = 80) -> Any:
    if isinstance(value, str) and len(value) > width:
        return value[: width - 1] + "…"
    return value


def _rows(result: dict) -> list[dict]:
    """Unexpected rows as {index column(s), column value}, clipped, at most MAX_EXAMPLES."""
    rows = result.get("unexpected_index_list") or []
    return [{key: _clip(value) for key, value in row.items()} for row in rows[:MAX_EXAMPLES]]


def _explain_schema(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    observed = result.get("observed_value") or []
    missing = [c for c in kwargs["column_set"] if c not in observed]
    return observed, missing, f"missing columns {missing} (found {observed})"


def _explain_has_text(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    count, config = result.get("unexpected_count", 0), facts["config"]
    ids = [row.get(config.data.id_column) for row in _rows(result)]
    return count, ids, (
        f"column {kwargs['column']!r} is null for {count} of {facts['rows']} labels: their ids have no "
        f"row in the texts file {config.data.texts} (e.g. ids {ids})"
    )


def _explain_empty(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    share = (result.get("unexpected_percent") or 0.0) / 100
    allowed = 1.0 - kwargs["mostly"]
    examples = _rows(result)
    return round(share, 6), examples, (
        f"{_percent(share)} of {kwargs['column']!r} values are empty or whitespace "
        f"({result.get('unexpected_count', 0)} of {result.get('element_count', 0)} rows; allowed {_percent(allowed)})"
    )


def _explain_length(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    count, bounds = result.get("unexpected_count", 0), facts["config"].validation
    lengths = sorted({len(str(value)) for value in result.get("unexpected_list") or []})
    shown: list[Any] = lengths if len(lengths) <= MAX_EXAMPLES else [*lengths[:5], "...", *lengths[-5:]]
    upper = bounds.max_text_length if bounds.max_text_length is not None else "any"
    return count, _rows(result), (
        f"{count} of {result.get('element_count', 0)} {kwargs['column']!r} values are not "
        f"{bounds.min_text_length}..{upper} characters long (lengths {shown})"
    )


def text_length_statistics(texts: pd.Series) -> dict[str, Any]:
    """Character lengths of the texts: quantiles and maximum, reported whether or not a bound is set."""
    lengths = texts.fillna("").astype(str).str.len()
    if lengths.empty:
        return {"rows": 0}
    quantiles = lengths.quantile([0.5, 0.95, 0.99]).round().astype(int).tolist()
    return {"rows": int(len(lengths)), "min": int(lengths.min()), "median": quantiles[0], "p95": quantiles[1],
            "p99": quantiles[2], "max": int(lengths.max())}


def _explain_known(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    count, values = result.get("unexpected_count", 0), _distinct(result.get("unexpected_list") or [])
    return values[: MAX_EXAMPLES * 5], _rows(result), (
        f"column {kwargs['column']!r} has {count} unexpected values {values[:MAX_EXAMPLES]} "
        f"(known: {kwargs['value_set']})"
    )


def _explain_unique(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    count, ids = result.get("unexpected_count", 0), _distinct(result.get("unexpected_list") or [])
    return count, ids[:MAX_EXAMPLES], (
        f"column {kwargs['column']!r} has {count} rows sharing {len(ids)} repeated ids {ids[:MAX_EXAMPLES]}"
    )


def _explain_min_rows(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    observed = result.get("observed_value")
    return observed, [], f"found {observed} rows, need at least {facts['config'].validation.min_rows}"


def _explain_per_class(result: dict, kwargs: dict, facts: dict) -> tuple[Any, list, str]:
    config = facts["config"]
    short = {row[CLASS_COLUMN]: int(row[COUNT_COLUMN]) for row in result.get("unexpected_index_list") or []}
    listed = ", ".join(f"{name!r} has {count}" for name, count in short.items())
    return facts["class_counts"], [], (
        f"column {config.data.label_column!r}: {listed} "
        f"(need at least {config.validation.min_rows_per_class} rows per class)"
    )


_EXPLAINERS = {
    "schema": _explain_schema,
    "has_text": _explain_has_text,
    "empty_text": _explain_empty,
    "text_length": _explain_length,
    "known_labels": _explain_known,
    "unique_ids": _explain_unique,
    "min_rows": _explain_min_rows,
    "rows_per_class": _explain_per_class,
}


def _exception_message(info: dict | None) -> str | None:
    """The error GX caught while evaluating an expectation (flat or keyed by metric), if any."""
    info = info or {}
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _explain(result, facts: dict) -> Check:
    """A GX ExpectationValidationResult as a :class:`Check` with a readable failure line."""
    expectation, key = result.expectation_config, result.expectation_config.meta["key"]
    kwargs, reason = dict(expectation.kwargs), str(expectation.description or expectation.type)
    expected = _plain({name: value for name, value in kwargs.items() if name not in {"batch_id", "column"}})
    column = facts["config"].data.label_column if key == "rows_per_class" else kwargs.get("column")
    error = _exception_message(result.exception_info)
    if error:
        problem = f"{reason}: could not be evaluated: {error}"
        return Check(reason, expectation.type, column, False, None, [], problem, expected)
    observed, examples, detail = _EXPLAINERS[key](result.result or {}, kwargs, facts)
    failure = None if result.success else f"{reason}: {detail}"
    return Check(
        reason, expectation.type, column, bool(result.success), _plain(observed), _plain(examples), failure, expected
    )


def _plain(value: Any) -> Any:
    """JSON-ready copy (numpy scalars and timestamps become plain values or strings)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# --------------------------------------------------------------------------------------------
# Reports


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} .pass{color:#17692e;font-weight:600} .fail{color:#b3261e;font-weight:600}
table{border-collapse:collapse;width:100%;margin-top:1em} th,td{border:1px solid #ddd;padding:.45em;
text-align:left;vertical-align:top;font-size:.92em} th{background:#f4f4f4} tr.failed{background:#fdecea}
code{font-family:ui-monospace,Menlo,monospace;font-size:.9em;white-space:pre-wrap}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dt{font-weight:600}
"""


def _cell(value: Any) -> str:
    if value in (None, [], {}):
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"<code>{html.escape(text)}</code>"


def _check_row(check: dict) -> str:
    verdict = '<span class="pass">PASS</span>' if check["success"] else '<span class="fail">FAIL</span>'
    cells = [
        html.escape(check["reason"]),
        f"<code>{html.escape(check['expectation'])}</code>",
        html.escape(check.get("column") or ""),
        _cell(check.get("expected")),
        verdict,
        _cell(check.get("observed")),
        _cell(check.get("examples")),
        html.escape(check.get("failure") or ""),
    ]
    row_class = "" if check["success"] else ' class="failed"'
    return f"<tr{row_class}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def render_html(result: dict) -> str:
    """A self-contained HTML page (inline CSS, no scripts or links) of a validation result."""
    ok = result["success"]
    checks = result.get("expectations") or []
    passed = sum(1 for check in checks if check["success"])
    facts = {
        "outcome": "passed" if ok else "FAILED",
        "expectations passed": f"{passed} of {len(checks)}",
        "rows": result.get("rows"),
        "rows per class": json.dumps(result.get("class_counts", {})),
        "text lengths (characters)": json.dumps(result["text_lengths"]) if result.get("text_lengths") else None,
        "fingerprint": result.get("fingerprint"),
        "texts": result.get("texts"),
        "labels": result.get("labels"),
        "error": result.get("error"),
    }
    details = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items() if v is not None
    )
    headings = ("reason", "expectation", "column", "expected", "result", "observed", "unexpected examples", "why")
    header = "<tr>" + "".join(f"<th>{heading}</th>" for heading in headings) + "</tr>"
    table = f"<table>{header}{''.join(_check_row(c) for c in checks)}</table>" if checks else ""
    verdict = '<span class="pass">passed</span>' if ok else '<span class="fail">failed</span>'
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>tuneloop data validation</title>"
        f"<style>{_CSS}</style></head><body><h1>Data validation {verdict}</h1>"
        f"<p>Great Expectations {html.escape(str(result.get('great_expectations', '')))}; "
        "every expectation is critical.</p>"
        f"<dl>{details}</dl>{table}{pii_table_html(result['pii']) if result.get('pii') else ''}</body></html>"
    )


def _write_outputs(result: dict, report_html: str | Path, result_json: str | Path) -> None:
    for path in (Path(report_html), Path(result_json)):
        path.parent.mkdir(parents=True, exist_ok=True)
    Path(result_json).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    Path(report_html).write_text(render_html(result), encoding="utf-8")


def _gx_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("great_expectations")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# The stage


def _load(config: TuneloopConfig, report_html: str | Path, result_json: str | Path) -> pd.DataFrame:
    """The joined frame; on a read error, write an error result and report, then re-raise."""
    try:
        return load_labelled_frame(config)
    except DataError as error:
        error.stage = error.stage or STAGE
        result = {"success": False, "rows": 0, "class_counts": {}, "fingerprint": None,
                  "error": error.message, "expectations": [], **_sources(config)}
        _write_outputs(result, report_html, result_json)
        raise


def _pii_checks(pii: dict, config: TuneloopConfig) -> list[Check]:
    """The expectation ``privacy.max_pii_row_share`` (only when set): counts only, never a text."""
    allowed = config.privacy.max_pii_row_share
    if allowed is None:
        return []
    share, ok = pii["row_share"], pii["row_share"] <= allowed
    failure = None if ok else (f"{_percent(share)} of rows contain personal data ({pii['rows_with_pii']} of "
                               f"{pii['rows']}); privacy.max_pii_row_share allows {_percent(allowed)}")
    per_type = {kind: counts["rows"] for kind, counts in pii["types"].items() if counts["rows"]}
    return [Check("at most privacy.max_pii_row_share of rows contain personal data", "tuneloop_max_pii_row_share",
                  config.data.text_column, ok, round(share, 6), [per_type] if per_type else [], failure,
                  {"max_pii_row_share": allowed})]


def _sources(config: TuneloopConfig) -> dict:
    return {"texts": str(config.data.texts), "labels": str(config.data.labels), "great_expectations": _gx_version()}


def run(config: TuneloopConfig, report_html: str | Path, result_json: str | Path) -> ValidationSummary:
    """Validate the labelled data; write ``result_json`` and ``report_html`` (always, also on failure).

    Raises:
        DataError: a data file is missing, unreadable or lacks a required column.
        DataValidationError: one or more expectations failed; ``failures`` has one line for each.
    """
    _log(f"reading labels {config.data.labels} and texts {config.data.texts}")
    frame = _load(config, report_html, result_json)
    counts, fingerprint = class_counts(frame, config), fingerprint_frame(frame)
    _log(f"{len(frame)} labelled rows, per class {counts}; running the Great Expectations suite")
    checks = validate_frame(frame, config)
    pii = pii_summary(frame[config.data.text_column], config.privacy)
    checks.extend(_pii_checks(pii, config))
    failures = [check.failure or check.reason for check in checks if not check.success]
    result = {"success": not failures, "rows": len(frame), "class_counts": counts, "fingerprint": fingerprint,
              "expectations": [asdict(check) for check in checks], "pii": pii,
              "text_lengths": text_length_statistics(frame[config.data.text_column]), **_sources(config)}
    _write_outputs(result, report_html, result_json)
    _log(f"{len(checks) - len(failures)} of {len(checks)} expectations passed; report {report_html}")
    if failures:
        raise DataValidationError(
            f"data validation failed: {len(failures)} of {len(checks)} expectations failed "
            f"(labels: {config.data.labels})",
            failures=failures, stage=STAGE, path=str(config.data.labels),
        )
    return ValidationSummary(len(frame), counts, fingerprint, True, len(checks))
