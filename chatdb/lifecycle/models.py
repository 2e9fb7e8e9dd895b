"""What a lifecycle run is asked to do, and what it returns: plans, options, counts and
results. Plain dataclasses, no database."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chatdb.defaults import DEFAULT_BATCH_SIZE, DEFAULT_JOBS, MAX_JOBS
from chatdb.defaults import DEFAULT_DELETED_GRACE as DEFAULT_DELETED_GRACE
from chatdb.errors import UsageError
from chatdb.lifecycle.durations import Duration

SLOW_TRANSACTION_SECONDS = 0.25  # reported: transactions longer than this


@dataclass
class Tally:
    """Rows moved or deleted: in the hot tables, and in the archive tables."""

    conversations: int = 0
    messages: int = 0
    archive_conversations: int = 0
    archive_messages: int = 0

    def add(self, other: Tally) -> None:
        self.conversations += other.conversations
        self.messages += other.messages
        self.archive_conversations += other.archive_conversations
        self.archive_messages += other.archive_messages

    def as_dict(self) -> dict[str, int]:
        return {
            "conversations": self.conversations,
            "messages": self.messages,
            "archive_conversations": self.archive_conversations,
            "archive_messages": self.archive_messages,
        }

    @property
    def rows(self) -> int:
        return self.conversations + self.messages + self.archive_conversations + self.archive_messages


@dataclass(frozen=True)
class Plan:
    """What a run will do: its cutoffs, taken from the database clock, and (when counted)
    exactly how many rows match them now."""

    command: str
    cutoff: dt.datetime | None = None
    deleted_cutoff: dt.datetime | None = None
    counts: Tally | None = None
    # archive restore: the conversations to bring back, and those of them already hot
    conversation_ids: tuple[uuid.UUID, ...] = ()
    user_id: str | None = None
    already_hot: tuple[uuid.UUID, ...] = ()


@dataclass
class Vacuum:
    """The dead rows a run left (the rows it deleted from each table, where they are enough
    for the table to need VACUUM, by doctor's rule), and what ``--vacuum`` did about them.

    PostgreSQL vacuums a table only for its owner (or a member of the owning role), the
    database's owner, a superuser or, from 17, a role with MAINTAIN on it, and skips any
    other with a WARNING: such a table is never in ``vacuumed``."""

    needed: dict[str, int] = field(default_factory=dict)
    #: The tables in ``needed`` that the role that ran it may not vacuum: who may.
    run_by: dict[str, str] = field(default_factory=dict)
    vacuumed: list[str] = field(default_factory=list)
    #: The tables ``--vacuum`` left because the role running it may not vacuum them: why.
    skipped: dict[str, str] = field(default_factory=dict)
    stopped_by: str | None = None  # a signal stopped the VACUUM: "interrupted", "terminated"

    def left(self) -> dict[str, int]:
        """The tables that still need VACUUM, with the dead rows the run left in each."""
        return {table: rows for table, rows in self.needed.items() if table not in self.vacuumed}

    def fix(self, tables: Iterable[str] | None = None) -> str:
        """The statement that vacuums ``tables`` (those left, by default)."""
        return " ".join(f"VACUUM (ANALYZE) {table};" for table in (self.left() if tables is None else tables))


@dataclass
class RunResult:
    command: str
    run_id: int | None
    plan: Plan
    done: Tally = field(default_factory=Tally)
    complete: bool = True
    stopped_by: str | None = None  # "interrupted", "terminated" or "max-runtime"
    remaining: Tally | None = None
    batches: int = 0
    longest_transaction_seconds: float = 0.0
    slow_transactions: int = 0  # longer than SLOW_TRANSACTION_SECONDS
    jobs: int = 1
    retries: int = 0  # batches rolled back and tried again (lock timeouts, deadlocks)
    elapsed_seconds: float = 0.0
    exported: int = 0
    took_over: list[int] = field(default_factory=list)  # earlier runs found dead
    vacuum: Vacuum = field(default_factory=Vacuum)

    @property
    def outcome(self) -> str:
        return "interrupted" if self.stopped_by in ("interrupted", "terminated") else "succeeded"


@dataclass
class RunOptions:
    """How a run proceeds. ``should_stop`` returns a reason ("interrupted", "terminated")
    once the user asked to stop; the run ends after the batch in flight."""

    batch_size: int = DEFAULT_BATCH_SIZE
    jobs: int = DEFAULT_JOBS
    max_runtime: Duration | None = None
    should_stop: Callable[[], str | None] = lambda: None
    progress: Callable[[Tally], None] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    #: Called as the run is about to record its outcome, after its last batch: returns a
    #: stop asked for until then ("interrupted", "terminated"), which stops the run; a
    #: stop asked for later changes nothing.
    recording: Callable[[], str | None] = lambda: None
    #: Called once the run's outcome is committed to its audit row: the run is over.
    recorded: Callable[[], None] = lambda: None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if not 1 <= self.jobs <= MAX_JOBS:
            raise UsageError(f"--jobs must be between 1 and {MAX_JOBS}")
