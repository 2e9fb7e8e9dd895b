"""How batches and windows size themselves: each aims at TARGET_BATCH_SECONDS, by the
speed its predecessor measured (see docs/architecture.md, "How batches size
themselves"). Pure arithmetic, no database."""

from __future__ import annotations

#: A batch aims at this duration; its size in conversations adapts to it.
TARGET_BATCH_SECONDS = 0.05
FIRST_BATCH_SIZE = 50
FIRST_WINDOW_BLOCKS = 4
MAX_WINDOW_BLOCKS = 1 << 20


def resized(current: int, done: int, elapsed: float, cap: int) -> int:
    """The next size (rows or blocks) of a batch whose ``done`` took ``elapsed`` seconds,
    aiming at TARGET_BATCH_SECONDS: at most half as large or half as large again as
    ``current``, and never above ``cap``. A conversation too large for the aim is still
    handled alone, in one transaction."""
    wanted = done * TARGET_BATCH_SECONDS / max(elapsed, 1e-4)
    return max(1, round(min(max(wanted, current / 2, 1), current * 1.5 + 1, cap)))
