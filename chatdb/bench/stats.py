"""Figures from pgbench's log: percentiles, histograms, and budgets' verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from chatdb.bench.pgbench import Transaction
from chatdb.bench.workload import OVERHEAD, Budget

#: Upper bounds (ms) of the histogram's buckets; the last bucket holds the rest, skipped
#: transactions included. Two steps per power of ten and one between: 1, 2, 5.
BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

OK, FAIL, NO_DATA = "ok", "fail", "no data"


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least p% of the values at or
    below it (what PostgreSQL's ``percentile_disc`` returns). ``ordered`` is sorted."""
    if not ordered:
        return None
    rank = math.ceil(Fraction(str(p)) * len(ordered) / 100)
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class Bucket:
    le_ms: float | None  # upper bound; None for the last, open bucket
    count: int


def histogram(ordered: Sequence[float]) -> list[Bucket]:
    counts = [0] * (len(BUCKETS_MS) + 1)
    for value in ordered:
        index = next((i for i, bound in enumerate(BUCKETS_MS) if value <= bound), len(BUCKETS_MS))
        counts[index] += 1
    bounds: list[float | None] = [*BUCKETS_MS, None]
    return [Bucket(bound, count) for bound, count in zip(bounds, counts, strict=True)]


@dataclass(frozen=True)
class BudgetResult:
    budget: Budget
    value_ms: float | None
    status: str  # "ok", "fail" or "no data"

    @property
    def metric(self) -> str:
        return self.budget.metric

    @property
    def limit_ms(self) -> float:
        return self.budget.limit_ms


@dataclass
class PatternFigures:
    """One pattern in one phase."""

    pattern: str
    transactions: int  # completed
    skipped: int
    failures: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)  # sorted; a skipped one is infinite
    budgets: list[BudgetResult] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0

    def at(self, p: float) -> float | None:
        return percentile(self.latencies_ms, p)

    @property
    def p50_ms(self) -> float | None:
        return self.at(50)

    @property
    def p95_ms(self) -> float | None:
        return self.at(95)

    @property
    def p99_ms(self) -> float | None:
        return self.at(99)

    @property
    def max_ms(self) -> float | None:
        return self.latencies_ms[-1] if self.latencies_ms else None

    @property
    def histogram(self) -> list[Bucket]:
        return histogram(self.latencies_ms)

    @property
    def ok(self) -> bool:
        return self.failures == 0 and all(result.status == OK for result in self.budgets)


def figures(
    names: Sequence[str],
    transactions: Sequence[Transaction],
    seconds: float,
    aborted: dict[int, int] | None = None,
) -> list[PatternFigures]:
    """Per pattern (``names[script_no]``): latencies from each transaction's scheduled
    start. ``aborted`` counts, per script, the clients that pgbench stopped on an error."""
    latencies: list[list[float]] = [[] for _ in names]
    skipped = [0] * len(names)
    failed = [0] * len(names)
    for t in transactions:
        if t.outcome == "done":
            assert t.latency_us is not None  # a transaction done has its latency
            latencies[t.script].append(t.latency_us / 1000)
        elif t.outcome == "skipped":
            skipped[t.script] += 1
            latencies[t.script].append(math.inf)
        else:
            failed[t.script] += 1
    for script, count in (aborted or {}).items():
        failed[script] += count
    result = []
    for index, name in enumerate(names):
        values = sorted(latencies[index])
        result.append(
            PatternFigures(name, len(values) - skipped[index], skipped[index], failed[index], seconds, values)
        )
    return result


def judge(patterns: list[PatternFigures], budgets: Sequence[Budget]) -> None:
    """Set each pattern's budgets' verdicts."""
    by_name = {p.pattern: p for p in patterns}
    for p in patterns:
        p.budgets = []
    for budget in budgets:
        mine = by_name.get(budget.pattern)
        if mine is None:
            continue
        if budget.metric == OVERHEAD:
            other = by_name.get("history-unfiltered")
            filtered, unfiltered = mine.p50_ms, other.p50_ms if other else None
            if filtered is None or unfiltered is None:
                value = None
            elif math.isinf(filtered) or math.isinf(unfiltered):
                value = math.inf  # the run fell behind its schedule: nothing to compare
            else:
                value = filtered - unfiltered
        else:
            assert budget.percentile is not None  # a budget's metric is a percentile, max or overhead
            value = mine.at(budget.percentile)
        status = NO_DATA if value is None else OK if value < budget.limit_ms else FAIL
        mine.budgets.append(BudgetResult(budget, value, status))
