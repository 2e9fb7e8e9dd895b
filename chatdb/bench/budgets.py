"""The mix of patterns a bench run sends, and the budgets it judges them by: parsed from
the command line, with no database library, so that ``chatdb bench --help`` shows the
defaults without importing one. The patterns themselves are ``chatdb.bench.workload``."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from chatdb.defaults import DEFAULT_MIX
from chatdb.errors import UsageError

#: The patterns a mix can name: chatdb/patterns.py's, as ``chatdb.bench.workload.WORKLOADS``
#: compiles them (``tests/unit/test_bench_budgets.py`` holds the two alike).
PATTERNS: tuple[str, ...] = tuple(DEFAULT_MIX)

# --- the mix -------------------------------------------------------------------------------

_WEIGHT = re.compile(r"[0-9]+")


def mix_text(mix: dict[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in mix.items())


def parse_mix(raw: str) -> dict[str, int]:
    """``history=40,recent=30,insert=30``: pattern names with whole-number weights."""
    mix: dict[str, int] = {}
    expected = "expected PATTERN=WEIGHT pairs separated by commas, such as history=40,recent=30,insert=30"
    for part in raw.split(","):
        name, sep, weight = (piece.strip() for piece in part.partition("="))
        if not sep or not name or not _WEIGHT.fullmatch(weight):
            raise UsageError(f"invalid --mix {raw!r}: {expected}")
        _known(name, "--mix")
        if name in mix:
            raise UsageError(f"invalid --mix {raw!r}: {name} appears twice")
        if int(weight) > 1000:
            raise UsageError(f"invalid --mix {raw!r}: weights go up to 1000")
        mix[name] = int(weight)
    mix = {name: weight for name, weight in mix.items() if weight}
    if not mix:
        raise UsageError(f"invalid --mix {raw!r}: every weight is zero")
    return mix


def _known(name: str, option: str) -> None:
    if name not in PATTERNS:
        raise UsageError(f"unknown pattern {name!r} in {option}: the patterns are {', '.join(PATTERNS)}")


# --- budgets -------------------------------------------------------------------------------

OVERHEAD = "overhead"
_PERCENTILE = re.compile(r"p([0-9]{1,2}(?:\.[0-9]{1,3})?)")


@dataclass(frozen=True)
class Budget:
    """A limit on one figure of one pattern. ``metric`` is a percentile (``p95``),
    ``max``, or ``overhead``: the soft-delete filter's cost, the median of ``history`` less
    the median of ``history-unfiltered`` (seed 003's "soft delete filtering overhead")."""

    pattern: str
    metric: str
    limit_ms: float
    source: str = "--budget"

    @property
    def key(self) -> str:
        return f"{self.pattern}.{self.metric}"

    @property
    def percentile(self) -> float | None:
        if self.metric == "max":
            return 100.0
        match = _PERCENTILE.fullmatch(self.metric)
        return float(match[1]) if match else None

    def describe(self) -> str:
        if self.metric == OVERHEAD:
            return f"soft-delete filter < {format_limit(self.limit_ms)}"
        return f"{self.metric} < {format_limit(self.limit_ms)}"


DEFAULT_BUDGETS: tuple[Budget, ...] = (
    Budget(
        "history", "p95", 50.0, "seed 003: 50 messages of a conversation < 50 ms (seed 000: p95 < 100 ms)"
    ),
    Budget("recent", "p95", 100.0, "seed 003: 20 conversations of a user < 100 ms"),
    Budget("insert", "p95", 50.0, "seed 000: message insert p95 < 50 ms"),
    Budget("message", "p95", 10.0, "seed 003: a single message < 10 ms"),
    Budget("history", OVERHEAD, 5.0, "seed 003: soft-delete filtering overhead < 5 ms"),
)

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)")
_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_latency(raw: str, option: str) -> float:
    """``50ms``, ``0.5s``, ``250us``: a latency in milliseconds, above zero."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if not match:
        raise UsageError(f"invalid {option} {raw!r}: expected a number and a unit (us, ms, s), such as 50ms")
    value = float(match[1]) * _TO_MS[match[2]]
    if value <= 0:
        raise UsageError(f"invalid {option} {raw!r}: it must be above zero")
    return value


def parse_budget(raw: str) -> Budget:
    """``insert.p95=50ms``, ``message.max=20ms``, ``history.overhead=5ms``."""
    key, sep, value = (piece.strip() for piece in raw.partition("="))
    pattern, dot, metric = key.partition(".")
    expected = (
        "expected PATTERN.METRIC=DURATION, such as insert.p95=50ms (metrics: p50, p95, p99.9, max, overhead)"
    )
    if not sep or not dot or not pattern or not metric:
        raise UsageError(f"invalid --budget {raw!r}: {expected}")
    _known(pattern, "--budget")
    metric = metric.lower()
    percentile = _PERCENTILE.fullmatch(metric)
    if metric == OVERHEAD:
        if pattern != "history":
            raise UsageError(
                f"invalid --budget {raw!r}: only history has an overhead (its soft-delete filter)"
            )
    elif metric != "max" and (percentile is None or not 0 < float(percentile[1]) < 100):
        raise UsageError(f"invalid --budget {raw!r}: unknown metric {metric!r}; {expected}")
    return Budget(pattern, metric, parse_latency(value, f"--budget {key}"))


def budgets_for(mix: dict[str, int], overrides: Sequence[Budget]) -> list[Budget]:
    """The default budgets of the patterns in the mix, each replaced by an override of the
    same pattern and metric; overrides of other metrics are added."""
    for budget in overrides:
        if budget.pattern not in mix:
            raise UsageError(f"--budget {budget.key}: the mix does not run {budget.pattern}")
        if budget.metric == OVERHEAD and "history-unfiltered" not in mix:
            raise UsageError(f"--budget {budget.key}: the mix must run history-unfiltered to measure it")
    chosen: dict[str, Budget] = {}
    for budget in DEFAULT_BUDGETS:
        if budget.pattern in mix and (budget.metric != OVERHEAD or "history-unfiltered" in mix):
            chosen[budget.key] = budget
    for budget in overrides:
        chosen[budget.key] = budget
    return list(chosen.values())


def format_ms(value: float | None) -> str:
    """A latency for people: 0.42 ms, 12.3 ms, 250 ms, 1.5 s."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    if value >= 1000:
        return f"{value / 1000:.3g} s"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def format_limit(value: float) -> str:
    """A budget as it was given: 50 ms, 0.5 ms, 2 s."""
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"
