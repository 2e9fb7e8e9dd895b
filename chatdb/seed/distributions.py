"""The plan of a seed: who owns each conversation, how long it is, and when each message
was written, as microseconds before the anchor (the database clock at the start).

Owners are Zipf-like (a few heavy users, many light ones), lengths log-normal with exact
totals, activity denser towards the anchor. Every draw comes from ``random.Random``
streams derived from the seed, in a fixed order: the same seed and sizes give the same
plan, whatever the rows are encoded into.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from chatdb.seed.content import CONVERSATION_METADATA
from chatdb.seed.request import SeedRequest

ARCHIVED_SHARE = 0.08  # conversations the user hid in the UI (status = 'archived')
SOFT_DELETED_SHARE = 0.04  # conversations the user deleted (deleted_at set)
MESSAGE_SOFT_DELETED_SHARE = 0.01
SYSTEM_FIRST_SHARE = 0.10

DAY_US = 86_400_000_000


class Plan:
    """Who owns each conversation and how long it is: heavy-tailed, exact totals."""

    def __init__(self, request: SeedRequest) -> None:
        # Memory stays flat in the data: per conversation, only two int arrays (no Python
        # object per row: a list of floats or tuples per conversation cost 90 MB at 10M
        # messages).
        rng = random.Random(request.seed)
        self.request = request
        # A few heavy users and many light ones (Zipf-like weights over shuffled users).
        order = array("i", range(request.users))
        rng.shuffle(order)
        weights = (1.0 / (rank + 1) ** 1.07 for rank in range(request.users))
        cumulative = array("d", itertools.accumulate(weights))
        total = cumulative[-1]
        owners = array("i", bytes(4 * request.conversations))
        for index in range(request.conversations):
            owners[index] = order[bisect.bisect_left(cumulative, rng.random() * total)]
        self.owners = owners
        del order, cumulative
        # Lengths: one message each, the rest spread with a long tail (log-normal shares).
        # Two passes over the same draws: their sum gives the scale, then each length is
        # the step of the running total's floor, so the lengths add up exactly.
        extra = request.messages - request.conversations
        start = rng.getstate()
        scale = extra / math.fsum(rng.lognormvariate(0.0, 1.1) for _ in range(request.conversations))
        rng.setstate(start)
        lengths = array("i", bytes(4 * request.conversations))
        running = 0.0
        assigned = 0
        for index in range(request.conversations):
            running += rng.lognormvariate(0.0, 1.1) * scale
            whole = min(int(running), extra) - assigned
            lengths[index] = 1 + whole
            assigned += whole
        lengths[-1] += extra - assigned  # what rounding left over, at most one message
        self.lengths = lengths
        self.conversation_seed = rng.getrandbits(64)
        self.message_seed = rng.getrandbits(64)

    def conversations(self, turns: int) -> Iterator[Conversation]:
        """Every conversation's row, in order. Each pass over the conversations walks the
        same random stream from its start, so every pass sees the same conversations."""
        rng = random.Random(self.conversation_seed)
        for index in range(self.request.conversations):
            yield conversation(self, index, rng, turns)

    def message_rng(self) -> random.Random:
        return random.Random(self.message_seed)


@dataclass
class Conversation:
    """What the conversations row needs; messages fill in between ``first`` and ``last``."""

    id: str
    user_id: str
    length: int
    system_first: bool
    first_turn: int
    created_before: int  # microseconds before the anchor
    first_before: int  # the first message
    last_before: int  # the last message: updated_at
    status: str
    deleted_before: int | None
    metadata: int | None  # an index into content.CONVERSATION_METADATA, or none


# The assistant answers in seconds; the user comes back after minutes, hours or, now and
# then, days (log-normal, median e**4.5 s = 90 s).
_ANSWER_SECONDS = (0.5, 25.0)
_RETURN_MU, _RETURN_SIGMA, _RETURN_CAP = 4.5, 1.8, 20 * 86_400.0


def _return_gaps() -> tuple[float, ...]:
    """4096 draws from a fixed stream: picking from a table is cheaper than exp(gauss())
    per gap, and as deterministic."""
    rng = random.Random(0x6A95)
    return tuple(min(math.exp(rng.gauss(_RETURN_MU, _RETURN_SIGMA)), _RETURN_CAP) for _ in range(4096))


_RETURN_GAPS = _return_gaps()


def conversation(plan: Plan, index: int, rng: random.Random, turns: int) -> Conversation:
    """One conversation's row, in constant time (the messages' own times come later, in
    ``message_times``, scaled to fit between its first and last message)."""
    length = plan.lengths[index]
    system_first = length >= 2 and rng.random() < SYSTEM_FIRST_SHARE
    answers = (length - int(system_first)) // 2
    returns = max(length - 1 - answers, 0)
    span_seconds = answers * 8.0 + returns * 90.0 * math.exp(rng.gauss(0.0, 1.0))
    span = max(int(span_seconds * 1_000_000), (length - 1) * 1_000)
    window = plan.request.days * DAY_US
    span = min(span, window // 2)
    last_before = min(int(rng.random() ** 1.6 * window), window - span)  # recent activity is denser
    first_before = last_before + span
    deleted_before = int(rng.random() * last_before) if rng.random() < SOFT_DELETED_SHARE else None
    return Conversation(
        id=uuid4(rng),
        user_id=f"{plan.request.user_prefix}{plan.owners[index]:07d}",
        length=length,
        system_first=system_first,
        first_turn=int(rng.random() * turns),
        created_before=first_before + int(rng.uniform(0.0, 5.0) * 1_000_000),
        first_before=first_before,
        last_before=last_before,
        status="archived" if rng.random() < ARCHIVED_SHARE else "active",
        deleted_before=deleted_before,
        metadata=int(rng.random() * len(CONVERSATION_METADATA)) if rng.random() < 0.5 else None,
    )


def message_times(c: Conversation, rng: random.Random) -> list[int]:
    """Each message's microseconds before the anchor, strictly decreasing (oldest first),
    from ``first_before`` to ``last_before`` exactly."""
    if c.length == 1:
        return [c.first_before]
    random_ = rng.random
    low, width = _ANSWER_SECONDS[0], _ANSWER_SECONDS[1] - _ANSWER_SECONDS[0]
    gaps = [
        low + random_() * width if (position - c.system_first) % 2 else _RETURN_GAPS[int(random_() * 4096)]
        for position in range(1, c.length)
    ]
    # Scale the gaps to the span, keeping each at least a millisecond.
    span = c.first_before - c.last_before
    spare = span - 1_000 * len(gaps)
    scale = spare / sum(gaps)
    times = [c.first_before]
    before = c.first_before
    for gap in gaps[:-1]:
        before -= 1_000 + int(gap * scale)
        times.append(before)
    times.append(c.last_before)
    return times


def user_joined_before(request: SeedRequest, rng: random.Random) -> int:
    """When a user signed up: one to ninety days before the seed's window opens."""
    return request.days * DAY_US + int(rng.uniform(1, 90) * DAY_US)


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid4(rng: random.Random) -> str:
    """A version-4 UUID from ``rng``, as text (the messages' ids are packed inline, in
    ``rows``)."""
    h = rng.randbytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"
