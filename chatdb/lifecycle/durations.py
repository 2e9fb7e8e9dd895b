"""Durations: ``--older-than``, ``--deleted-grace``, ``--max-runtime``.

Whole numbers with exact units, so that a cutoff means the same on every server and in
every time zone (see docs/architecture.md, "A run, step by step")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from chatdb.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
# ASCII digits only: \d and int() also take the digits of other scripts (Arabic-Indic,
# fullwidth), which a duration never has.
_DURATION = re.compile(r"(?:[0-9]+[a-z]+)+")
_PART = re.compile(r"([0-9]+)([a-z]+)")
MAX_DURATION_SECONDS = 36_525 * 86_400  # 100 years


@dataclass(frozen=True)
class Duration:
    text: str
    seconds: int

    def __str__(self) -> str:
        return self.text


def parse_duration(raw: str, option: str = "duration", *, such_as: str = "90d or 1d12h") -> Duration:
    """``90d``, ``12h``, ``1d12h``, ``2w``: whole numbers with a unit (s, m, h, d, w).
    Units are exact: a day is 86,400 seconds. ``such_as`` gives examples that fit the
    option, for the error."""
    value = raw.strip().lower()
    expected = f"expected a whole number and a unit (s, m, h, d, w), such as {such_as}"
    if not _DURATION.fullmatch(value):
        raise UsageError(f"invalid {option} {raw!r}: {expected}")
    seconds = 0
    seen: set[str] = set()
    for number, unit in _PART.findall(value):
        if unit not in _UNITS:
            raise UsageError(f"invalid {option} {raw!r}: unknown unit {unit!r}; {expected}")
        if unit in seen:
            raise UsageError(f"invalid {option} {raw!r}: the unit {unit!r} appears twice")
        seen.add(unit)
        seconds += int(number) * _UNITS[unit]
    if seconds <= 0:
        raise UsageError(f"invalid {option} {raw!r}: it must be longer than zero")
    if seconds > MAX_DURATION_SECONDS:
        raise UsageError(f"invalid {option} {raw!r}: more than 100 years")
    return Duration(value, seconds)
