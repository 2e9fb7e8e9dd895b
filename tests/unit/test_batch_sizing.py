"""How batches and windows size themselves, without a database: each aims at 50 ms by the
speed its predecessor measured, changes by at most half, and stays within its cap."""

from __future__ import annotations

import pytest

from chatdb.lifecycle.phases import Taken
from chatdb.lifecycle.sizing import (
    FIRST_WINDOW_BLOCKS,
    MAX_FIXED_SECONDS,
    MAX_WINDOW_BLOCKS,
    TARGET_BATCH_SECONDS,
    fixed_cost,
    resized,
)
from chatdb.lifecycle.workers import Pass, Worker, advance, claim


def test_the_aim_is_50_ms():
    assert TARGET_BATCH_SECONDS == 0.05


@pytest.mark.parametrize(
    "current, done, elapsed, cap, expected",
    [
        (100, 100, 0.05, 1000, 100),  # on target: unchanged
        (100, 100, 0.0625, 1000, 80),  # a little slow: what 50 ms would have held
        (100, 100, 0.04, 1000, 125),  # a little fast
        (100, 100, 1.0, 1000, 50),  # far too slow: halved, no more
        (100, 100, 0.001, 1000, 151),  # far too fast: half as large again, and one
        (10, 10, 0.0, 1000, 16),  # no measurable time: as fast as can be, within the step
        (800, 800, 0.01, 1000, 1000),  # the cap (--batch-size)
        (1, 1, 10.0, 1000, 1),  # one conversation too large for the aim still goes alone
        (2, 2, 10.0, 1000, 1),
        (50, 50, 0.05, 7, 7),  # a cap below the size
    ],
)
def test_the_next_size(current, done, elapsed, cap, expected):
    assert resized(current, done, elapsed, cap) == expected


@pytest.mark.parametrize("rows_per_second", [40, 1_000, 20_000])
def test_at_a_steady_speed_batches_settle_on_what_50_ms_holds(rows_per_second):
    size = 50
    sizes = []
    for _ in range(30):
        size = resized(size, size, size / rows_per_second, cap=10_000)
        sizes.append(size)
    aim = rows_per_second * TARGET_BATCH_SECONDS
    assert sizes[-1] == pytest.approx(max(aim, 1), abs=1)
    # Never less than half, or more than half as large again (and one), as the last,
    # to the nearest whole row.
    for before, after in zip([50, *sizes], sizes, strict=False):
        assert before / 2 - 0.5 <= after <= before * 1.5 + 1.5


@pytest.mark.parametrize("fixed", [0.0, 0.001, 0.03, 0.045])
def test_with_a_fixed_cost_per_batch_batches_settle_on_50_ms_of_work_beyond_it(fixed):
    """Each batch costs ``fixed`` seconds whatever its size (round trips) and 1 ms a row.
    Sized by their whole time, batches whose fixed cost nears the aim would shrink to one
    row; sized by the time beyond the fixed cost, they settle on 50 rows."""
    size, timings = 50, {}
    for _ in range(40):
        elapsed = fixed + size * 0.001
        timings[size] = min(timings.get(size, elapsed), elapsed)
        size = resized(size, size, elapsed, cap=10_000, fixed=fixed_cost(timings))
    assert size == pytest.approx(50, abs=1)
    # Read exactly once sizes apart were measured (with a small fixed cost they need not be).
    assert fixed_cost(timings) == pytest.approx(fixed) or (fixed < 0.01 and fixed_cost(timings) <= fixed)


def test_a_fixed_cost_past_the_aim_is_counted_up_to_50_ms_and_batches_do_not_collapse():
    """80 ms a batch and 1 ms a row: counted as 50 ms, batches settle on 20 rows (100 ms
    in all); sized by their whole time, they would shrink to one row or two."""
    size, timings = 50, {}
    for _ in range(40):
        elapsed = 0.08 + size * 0.001
        timings[size] = min(timings.get(size, elapsed), elapsed)
        size = resized(size, size, elapsed, cap=10_000, fixed=fixed_cost(timings))
    assert fixed_cost(timings) == MAX_FIXED_SECONDS
    assert size == pytest.approx(20, abs=1)
    size = 50
    for _ in range(40):
        size = resized(size, size, 0.08 + size * 0.001, cap=10_000)
    assert size <= 2


def test_the_fixed_cost_is_read_from_the_shortest_times_of_sizes_apart():
    """The line through the smallest and the largest size's shortest times, at zero rows,
    at most MAX_FIXED_SECONDS."""
    assert fixed_cost({}) == 0.0
    assert fixed_cost({50: 0.06}) == 0.0  # one size: nothing to tell
    assert fixed_cost({50: 0.06, 51: 0.061}) == 0.0  # too close to tell
    assert fixed_cost({10: 0.03, 50: 0.07}) == pytest.approx(0.02)
    assert fixed_cost({10: 0.03, 30: 0.5, 50: 0.07}) == pytest.approx(0.02)  # a slow one between
    assert fixed_cost({10: 0.3, 50: 0.3}) == MAX_FIXED_SECONDS  # all fixed: at most 50 ms
    assert fixed_cost({10: 0.04, 50: 0.02}) == 0.04  # faster when larger: the smaller's time
    assert resized(10, 10, 0.3, cap=1000, fixed=0.25) == resized(10, 10, 0.3, cap=1000, fixed=0.05)
    assert resized(100, 100, 0.05, cap=1000, fixed=1.0) == 151  # all fixed: grows by the step


def worker(blocks: int = FIRST_WINDOW_BLOCKS) -> Worker:
    return Worker(connection=None, size=50, blocks=blocks)  # type: ignore[arg-type]


def test_workers_claim_windows_one_after_another_until_the_table_ends():
    table = Pass(end_block=10)
    first, second = worker(blocks=4), worker(blocks=8)
    assert claim(first, table) == ("(0,0)", 4)
    assert claim(second, table) == ("(4,0)", 12)
    assert claim(first, table) == ("(0,0)", 4)  # the rest of the window it holds
    first.window = None
    assert claim(first, table) is None  # block 12 is past the end
    assert table.next_block == 12


def test_a_full_batch_leaves_the_rest_of_its_window_to_the_next():
    w = worker()
    w.window = ("(8,0)", 12)
    advance(w, w.window, Taken(picked=50, last="(9,17)"), full=True, elapsed=0.2)
    assert w.window == ("(9,17)", 12)
    assert w.blocks == FIRST_WINDOW_BLOCKS  # a window is sized when it closes


def test_a_full_batch_with_nothing_inside_its_window_closes_it():
    w = worker()
    w.window = ("(8,0)", 12)
    advance(w, w.window, Taken(picked=50, last=None), full=True, elapsed=0.2)
    assert w.window is None
    assert w.blocks == FIRST_WINDOW_BLOCKS


@pytest.mark.parametrize(
    "elapsed, blocks",
    [
        (0.05, 4),  # the window's 4 blocks took 50 ms
        (0.01, 7),  # fast: half as large again, and one
        (0.5, 2),  # slow: halved
    ],
)
def test_a_short_batch_closes_its_window_and_sizes_the_next_by_its_time(elapsed, blocks):
    w = worker()
    w.window = ("(8,0)", 12)
    advance(w, w.window, Taken(picked=3, last="(11,2)"), full=False, elapsed=elapsed)
    assert w.window is None
    assert w.blocks == blocks


def test_windows_never_grow_past_the_cap():
    w = worker(blocks=MAX_WINDOW_BLOCKS)
    window = ("(0,0)", MAX_WINDOW_BLOCKS)
    advance(w, window, Taken(picked=1, last="(0,1)"), full=False, elapsed=0.0)
    assert w.blocks == MAX_WINDOW_BLOCKS
