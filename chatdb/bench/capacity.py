"""The capacity search: the highest rate at which every budget holds."""

from __future__ import annotations

import math

from chatdb.bench import phases
from chatdb.bench.model import BenchRequest, Phase, Step
from chatdb.bench.phases import Context

#: Where the capacity search starts (unless --min-capacity says), and how close it gets.
START_RATE = 100.0
MIN_RATE = 1.0
PRECISION = 0.10


def next_rate(lo: float | None, hi: float | None, request: BenchRequest) -> float | None:
    """The capacity search: double while every budget holds, halve while none does, then
    narrow the highest rate that held and the lowest that did not to within 10%."""
    if hi is None:
        assert lo is not None
        if request.max_rate is not None and lo >= request.max_rate:
            return None
        return min(lo * 2, request.max_rate) if request.max_rate is not None else lo * 2
    if lo is None:
        # Below --min-capacity already: the verdict is known, the rest would be detail.
        if request.min_capacity is not None or hi <= MIN_RATE:
            return None
        return max(_round(hi / 2), MIN_RATE)
    if hi / lo <= 1 + PRECISION:
        return None
    middle = _round(math.sqrt(lo * hi))
    return middle if lo < middle < hi else None


def _round(rate: float) -> float:
    """Two significant digits: 1,131 tps is tried as 1,100."""
    if rate <= 0:
        return rate
    digits = 1 - math.floor(math.log10(rate))
    return round(rate, digits) if digits > 0 else float(round(rate, digits))


def search(ctx: Context) -> tuple[list[Step], Phase, float | None, bool]:
    request = ctx.request
    rate = request.min_capacity or START_RATE
    if request.max_rate is not None:
        rate = min(rate, request.max_rate)
    steps: list[Step] = []
    lo = hi = None
    best: Phase | None = None
    lowest_failed: Phase | None = None
    while True:
        number = len(steps) + 1
        phase = phases.phase(ctx, f"step{number}", rate, f"step {number}: {rate:,.6g} tps")
        steps.append(Step(rate, phase.ok, phase.tps, phase.missed()))
        if phase.ok:
            lo, best = rate, phase
        else:
            hi = rate
            if lowest_failed is None or rate < lowest_failed.rate_tps:
                lowest_failed = phase
        following = next_rate(lo, hi, request)
        if following is None:
            break
        rate = following
    capped = request.max_rate is not None and lo is not None and lo >= request.max_rate
    if best is not None:
        return steps, best, lo, capped
    assert lowest_failed is not None
    return steps, lowest_failed, None, False
