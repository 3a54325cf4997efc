"""One line of the gate decision, and how an interval becomes one.

The decision JSON keeps its contract ``{"blessed", "checks": [{"name", "value", "threshold",
"passed"}]}``; each check adds its interval (``low``, ``high``, ``confidence``), its ``status``
(``passed``, ``failed``, ``undecided``, or ``reported`` for a line that is not gated), the ``rows``
it was decided on, the ``rows_needed`` to decide it, and a ``note`` in words.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneloop.config import EvaluationConfig
from tuneloop.gate_stats import FAILED, PASSED, UNDECIDED, Interval, Verdict

REPORTED = "reported"
"""Status of a line shown with its interval but not gated (accuracy's McNemar test, small slices)."""


@dataclass
class Check:
    """One line of the gate decision."""

    name: str
    value: float | str | None
    threshold: float | str | None
    passed: bool
    low: float | None = None
    high: float | None = None
    confidence: float | None = None
    status: str | None = None
    rows: int | None = None
    rows_needed: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.status is None:
            self.status = PASSED if self.passed else FAILED

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "passed": self.passed,
                "low": self.low, "high": self.high, "confidence": self.confidence, "status": self.status,
                "rows": self.rows, "rows_needed": self.rows_needed, "note": self.note}

    @property
    def gated(self) -> bool:
        return self.status != REPORTED


def _round(value: float) -> float:
    return round(float(value), 4)


def interval_check(name: str, interval: Interval, threshold: float, verdict: Verdict, *, point_passed: bool,
                   settings: EvaluationConfig, what: str) -> Check:
    """A check decided on its interval, following ``settings.when_undecided`` when it is undecided.

    Args:
        name: the check's name.
        interval: the value and its interval, in the units of ``threshold``.
        threshold: the bound the value is compared with.
        verdict: :func:`tuneloop.gate_stats.decide` of the claim the check makes.
        point_passed: what the rule without uncertainty says (the point value against the threshold).
        what: the claim in words, for the note ("the challenger trails the champion by at most 1 point").
    """
    confidence = f"{interval.confidence:.0%}"
    if verdict.status == PASSED:
        passed, note = True, f"shown with {confidence} confidence: {what}"
    elif verdict.status == FAILED:
        passed, note = False, f"not shown with {confidence} confidence: {what}"
    else:
        needed = f"about {verdict.rows_needed} rows" if verdict.rows_needed else "more rows"
        passed = settings.when_undecided == "keep_threshold_only" and point_passed
        follow = ("decided on the point value (when_undecided: keep_threshold_only)"
                  if settings.when_undecided == "keep_threshold_only" else "rejected (when_undecided: reject)")
        note = (f"undecided: {interval.rows} test rows cannot show with {confidence} confidence that {what}; "
                f"{needed} would; {follow}")
    return Check(name, _round(interval.estimate), threshold, passed, _round(interval.low), _round(interval.high),
                 interval.confidence, verdict.status if verdict.status != UNDECIDED else UNDECIDED, interval.rows,
                 verdict.rows_needed, note)


def reported_check(name: str, interval: Interval, note: str) -> Check:
    """A line shown with its interval that does not gate (passes by construction, status ``reported``)."""
    return Check(name, _round(interval.estimate), None, True, _round(interval.low), _round(interval.high),
                 interval.confidence, REPORTED, interval.rows, None, note)
