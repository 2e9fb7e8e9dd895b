"""How batches and windows size themselves: each aims at TARGET_BATCH_SECONDS, by the
speed its predecessor measured (see docs/architecture.md, "How batches size
themselves"). Pure arithmetic, no database."""

from __future__ import annotations

#: A batch aims at this duration; its size in conversations adapts to it.
TARGET_BATCH_SECONDS = 0.05
FIRST_BATCH_SIZE = 50
#: The most of a batch's time counted as its fixed cost (see ``resized`` and
#: ``fixed_cost``): a batch aims at TARGET_BATCH_SECONDS beyond it, so at most 100 ms.
MAX_FIXED_SECONDS = 0.05
FIRST_WINDOW_BLOCKS = 4
MAX_WINDOW_BLOCKS = 1 << 20


def resized(current: int, done: int, elapsed: float, cap: int, fixed: float = 0.0) -> int:
    """The next size (rows or blocks) of a batch whose ``done`` took ``elapsed`` seconds,
    aiming at TARGET_BATCH_SECONDS: at most half as large or half as large again as
    ``current``, and never above ``cap``. A conversation too large for the aim is still
    handled alone, in one transaction.

    ``fixed`` is what a batch costs whatever its size (its round trips: on Citus each
    statement goes from the coordinator to a worker and back), at most
    MAX_FIXED_SECONDS: the aim is TARGET_BATCH_SECONDS of work beyond it. Sized by its
    whole time instead, a batch whose fixed cost nears the aim would shrink to one row
    and stay there, all round trips and no work."""
    fixed = min(max(fixed, 0.0), MAX_FIXED_SECONDS, elapsed)
    wanted = done * TARGET_BATCH_SECONDS / max(elapsed - fixed, 1e-4)
    return max(1, round(min(max(wanted, current / 2, 1), current * 1.5 + 1, cap)))


def fixed_cost(timings: dict[int, float]) -> float:
    """What a batch costs whatever its size, from ``timings``: the shortest time measured
    for each size (rows). The line through the smallest and the largest size's shortest
    times (each the least disturbed by a busy machine) meets zero rows at the fixed
    cost; 0 until two sizes apart have been measured."""
    if len(timings) < 2:
        return 0.0
    small, large = min(timings), max(timings)
    if large - small < max(2, small // 5):
        return 0.0
    per_row = max(timings[large] - timings[small], 0.0) / (large - small)
    return min(max(timings[small] - per_row * small, 0.0), MAX_FIXED_SECONDS)
