"""Durations (``--older-than``, ``--deleted-grace``, ``--max-runtime``), without a database:
exact units, and every malformed spelling refused as bad usage, naming the option."""

from __future__ import annotations

import pytest

from chatdb.errors import UsageError
from chatdb.lifecycle import MAX_DURATION_SECONDS, Duration, parse_duration


@pytest.mark.parametrize(
    "raw, seconds",
    [
        ("1s", 1),
        ("90m", 90 * 60),
        ("36h", 36 * 3600),
        ("180d", 180 * 86_400),
        ("3w", 21 * 86_400),
        ("1w2d3h4m5s", 604_800 + 2 * 86_400 + 3 * 3600 + 4 * 60 + 5),
        ("5s1w", 604_800 + 5),  # units in any order
        ("007d", 7 * 86_400),
        (" 12H ", 12 * 3600),  # spaces around, and capitals, as typed
        ("36525d", 36_525 * 86_400),  # 100 years exactly
    ],
)
def test_units_are_exact_seconds(raw, seconds):
    duration = parse_duration(raw)
    assert duration.seconds == seconds
    assert str(duration) == raw.strip().lower()


def test_a_day_is_always_86400_seconds():
    assert parse_duration("1d") == Duration("1d", 86_400)
    assert parse_duration("1d").seconds * 7 == parse_duration("1w").seconds


@pytest.mark.parametrize(
    "raw, why",
    [
        ("", "expected a whole number and a unit"),
        ("90", "expected a whole number and a unit"),
        ("d", "expected a whole number and a unit"),
        ("1.5d", "expected a whole number and a unit"),
        ("-5d", "expected a whole number and a unit"),
        ("90 days", "expected a whole number and a unit"),
        ("1d 2h", "expected a whole number and a unit"),
        ("90x", "unknown unit 'x'"),
        ("2y", "unknown unit 'y'"),
        ("5days", "unknown unit 'days'"),
        ("1d1d", "the unit 'd' appears twice"),
        ("1h30m2h", "the unit 'h' appears twice"),
        ("0d", "longer than zero"),
        ("0h0m", "longer than zero"),
        ("36525d1s", "more than 100 years"),
        ("99999999999999999999w", "more than 100 years"),
        ("\u0669\u0660d", "expected a whole number and a unit"),  # Arabic-Indic 90
        ("\uff19\uff10d", "expected a whole number and a unit"),  # fullwidth 90
    ],
)
def test_malformed_durations_are_usage_errors_naming_the_option(raw, why):
    with pytest.raises(UsageError) as refused:
        parse_duration(raw, "--older-than")
    message = refused.value.message
    assert message.startswith(f"invalid --older-than {raw!r}: ")
    assert why in message
    assert refused.value.exit_code == 2


def test_the_limit_is_a_hundred_years():
    assert MAX_DURATION_SECONDS == 36_525 * 86_400
    assert parse_duration(f"{MAX_DURATION_SECONDS}s").seconds == MAX_DURATION_SECONDS
    with pytest.raises(UsageError):
        parse_duration(f"{MAX_DURATION_SECONDS + 1}s")
