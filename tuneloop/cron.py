"""Cron expressions as KFP's scheduler reads them (robfig/cron: six fields, seconds first).

A classic five-field expression gets ``0`` seconds prepended; left as five fields, KFP would read the
minute as the second. Descriptors KFP knows (``@daily``, ``@every 1h``) pass as they are. Anything
else is a :class:`~tuneloop.errors.ConfigError` naming the value and the reason.
"""

from __future__ import annotations

import re

from tuneloop.errors import ConfigError

CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_EVERY = re.compile(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
CRON_FIELDS = (  # name, lowest, highest, names (numbered from lowest)
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 6, WEEKDAYS),
)
CRON_ITEM = re.compile(r"(?P<start>\*|\?|\w+)(-(?P<end>\w+))?(/(?P<step>\d+))?")


def normalize_cron(expression: str) -> str:
    """Check a cron expression and return it in KFP's six-field form (seconds first).

    Five classic fields (minute hour day-of-month month day-of-week) get ``0`` seconds prepended;
    six fields pass as they are; so do the descriptors KFP's parser knows (``@daily``, ``@every 1h``).

    Raises:
        ConfigError: the expression is not valid for KFP, naming the value and the reason.
    """
    text = " ".join(str(expression).split())
    if text.startswith("@"):
        if text in CRON_DESCRIPTORS or CRON_EVERY.fullmatch(text):
            return text
        known = ", ".join(CRON_DESCRIPTORS)
        raise _cron_error(expression, f"unknown descriptor; use one of {known} or @every <duration>")
    fields = text.split(" ") if text else []
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        expected = "expected 5 (minute hour day month weekday) or 6 (seconds first)"
        raise _cron_error(expression, f"has {len(fields)} fields, {expected}")
    for value, spec in zip(fields, CRON_FIELDS):
        problem = _cron_field_problem(value, *spec)
        if problem:
            raise _cron_error(expression, problem)
    return " ".join(fields)


def _cron_error(expression: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid cron expression '{expression}': {reason}", field="cron")


def _cron_field_problem(value: str, field: str, low: int, high: int, names: tuple[str, ...]) -> str | None:
    """Why ``value`` is not a valid cron ``field`` (robfig/cron syntax), or None when it is."""
    for item in value.split(","):
        match = CRON_ITEM.fullmatch(item)
        if not match:
            return f"the {field} field '{value}' is not a value, range, list or step"
        start, end, step = match.group("start", "end", "step")
        if step is not None and int(step) == 0:
            return f"the {field} field '{value}' has a step of 0"
        if start in ("*", "?"):
            if end is not None:
                return f"the {field} field '{value}' puts a range after '{start}'"
            continue
        numbers = [_cron_number(part, low, names) for part in (start, end) if part is not None]
        for part, number in zip((start, end), numbers):
            if number is None or not low <= number <= high:
                spelled = f" or {names[0]}-{names[-1]}" if names else ""
                return f"'{part}' is not a valid {field} ({low}-{high}{spelled})"
        if len(numbers) == 2 and numbers[0] > numbers[1]:
            return f"the {field} field '{value}' has a range that ends before it starts"
    return None


def _cron_number(part: str, low: int, names: tuple[str, ...]) -> int | None:
    if part.isdigit():
        return int(part)
    upper = part.upper()
    return names.index(upper) + low if upper in names else None
