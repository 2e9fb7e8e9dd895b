"""What to seed (``SeedRequest``), what came of it, and the limits of both."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from chatdb.defaults import DEFAULT_CONVERSATIONS, DEFAULT_DAYS, DEFAULT_MESSAGES, DEFAULT_SEED, DEFAULT_USERS
from chatdb.errors import UsageError

USER_PREFIX = "seed-"
#: The ids seed gives its users: ``seed-<SEED>-<NUMBER>``, seven digits or more. A user of
#: the application whose id only starts with ``seed-`` is not one of them.
SEEDED_ID = "^seed-[0-9]+-[0-9]{7,}$"
#: Whether the column ``{}`` holds a seeded user's id (``prefix`` and ``pattern`` bound):
#: the prefix lets an index narrow the scan, the pattern decides.
SEEDED = "(starts_with({0}, :prefix) AND {0} ~ :pattern)"


def seeded(seed: int | None = None) -> dict[str, str]:
    """The parameters of ``SEEDED``: every seed's users, or those of ``seed``."""
    if seed is None:
        return {"prefix": USER_PREFIX, "pattern": SEEDED_ID}
    return {"prefix": f"{USER_PREFIX}{seed}-", "pattern": f"^{USER_PREFIX}{seed}-[0-9]{{7,}}$"}


MAX_DAYS = 36_500
#: Far past anything a machine seeds, and inside what the generator's counters hold.
MAX_COUNT = 10**12

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class SeedRequest:
    users: int = DEFAULT_USERS
    conversations: int = DEFAULT_CONVERSATIONS
    messages: int = DEFAULT_MESSAGES
    days: int = DEFAULT_DAYS
    seed: int = DEFAULT_SEED

    def validate(self) -> None:
        for name in ("users", "conversations", "messages", "days"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be a positive whole number, not {getattr(self, name)}")
            if getattr(self, name) > MAX_COUNT:
                raise UsageError(f"--{name} must be at most {MAX_COUNT:,}, not {getattr(self, name):,}")
        if not 0 <= self.seed <= MAX_COUNT:
            raise UsageError(f"--seed must be between 0 and {MAX_COUNT:,}, not {self.seed:,}")
        if self.messages < self.conversations:
            raise UsageError(
                f"--messages ({self.messages}) must be at least --conversations "
                f"({self.conversations}): every conversation has at least one message"
            )
        if self.days > MAX_DAYS:
            raise UsageError(f"--days must be at most {MAX_DAYS}, not {self.days}")

    @property
    def user_prefix(self) -> str:
        return f"{USER_PREFIX}{self.seed}-"

    @property
    def rows(self) -> int:
        return self.users + self.conversations + self.messages


@dataclass(frozen=True)
class SeedResult:
    seed: int
    users: int
    conversations: int
    messages: int
    anchor: dt.datetime
    fast_path: bool
    elapsed: float

    @classmethod
    def of(cls, request: SeedRequest, anchor: dt.datetime, fast_path: bool, elapsed: float) -> SeedResult:
        """What a run of ``request`` did."""
        return cls(
            request.seed, request.users, request.conversations, request.messages, anchor, fast_path, elapsed
        )

    @property
    def rows_per_second(self) -> float:
        return (self.users + self.conversations + self.messages) / self.elapsed if self.elapsed else 0.0


@dataclass(frozen=True)
class ResetResult:
    """The seeded users a reset deletes, and the rows of theirs it deletes with them by
    cascade, in the hot tables and in the archive."""

    users: int
    conversations: int
    messages: int
    archived_conversations: int
    archived_messages: int
