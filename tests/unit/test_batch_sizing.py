"""How batches and windows size themselves, without a database: each aims at 50 ms by the
speed its predecessor measured, changes by at most half, and stays within its cap."""

from __future__ import annotations

import pytest

from chatdb.lifecycle.phases import Taken
from chatdb.lifecycle.sizing import FIRST_WINDOW_BLOCKS, MAX_WINDOW_BLOCKS, TARGET_BATCH_SECONDS, resized
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
