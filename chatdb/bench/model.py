"""What ``chatdb bench`` is asked to do, and what it found."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatdb.bench import stats, workload
from chatdb.bench.stats import PatternFigures
from chatdb.bench.workload import Budget
from chatdb.defaults import DEFAULT_CLIENTS, DEFAULT_SECONDS
from chatdb.errors import UsageError

#: Progress: (what runs, seconds elapsed, seconds in all or None when unknown).
Progress = Callable[[str, float, float | None], None]


@dataclass(frozen=True)
class BenchRequest:
    clients: int = DEFAULT_CLIENTS
    rate: float | None = None
    min_capacity: float | None = None
    max_rate: float | None = None
    seconds: int = DEFAULT_SECONDS
    mix: dict[str, int] = field(default_factory=lambda: dict(workload.DEFAULT_MIX))
    budgets: tuple[Budget, ...] = ()  # overrides of the defaults
    while_command: tuple[str, ...] | None = None
    log_dir: Path | None = None  # keep pgbench's scripts and logs there

    def validate(self) -> list[Budget]:
        """Refuse impossible requests (UsageError); return the budgets that apply."""
        if self.clients < 1:
            raise UsageError(f"--clients must be at least 1, not {self.clients}")
        if self.seconds < 1:
            raise UsageError("--duration must be at least one second")
        for option, value in (("--rate", self.rate), ("--min-capacity", self.min_capacity)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(
                    f"{option} must be a number of transactions per second above zero, not {value:g}"
                )
        if self.max_rate is not None and not (math.isfinite(self.max_rate) and self.max_rate > 0):
            raise UsageError(f"--max-rate must be above zero, not {self.max_rate:g}")
        if self.rate is not None and self.min_capacity is not None:
            raise UsageError("--min-capacity applies to the capacity search: give it or --rate, not both")
        if self.rate is not None and self.max_rate is not None:
            raise UsageError("--max-rate bounds the capacity search: give it or --rate, not both")
        if self.min_capacity is not None and self.max_rate is not None and self.min_capacity > self.max_rate:
            raise UsageError("--min-capacity is above --max-rate: the search could never reach it")
        if self.while_command is not None and not self.while_command:
            raise UsageError('--while needs a chatdb command, such as "purge --older-than 90d"')
        return workload.budgets_for(self.mix, self.budgets)


@dataclass(frozen=True)
class CommandOutcome:
    """The --while command: how it ended and what it said. Only what may be shown: its
    arguments and its output with every password masked (the arguments it ran with, the
    password included, are the request's)."""

    shown: tuple[str, ...]
    exit_code: int
    seconds: float
    stdout: str
    stderr: str


@dataclass
class Phase:
    name: str  # "alone" or "during"
    rate_tps: float
    seconds: float
    patterns: list[PatternFigures]
    errors: list[str] = field(default_factory=list)
    command: CommandOutcome | None = None
    log: Path | None = None  # pgbench's log files are this path with a suffix

    @property
    def ok(self) -> bool:
        return not self.errors and all(p.ok for p in self.patterns)

    @property
    def tps(self) -> float:
        return sum(p.transactions for p in self.patterns) / self.seconds if self.seconds > 0 else 0.0

    def missed(self) -> list[str]:
        """What went wrong, by budget key (``insert.p95``) or ``pattern.failures``."""
        missed = []
        for p in self.patterns:
            if p.failures:
                missed.append(f"{p.pattern}.failures")
            missed += [r.budget.key for r in p.budgets if r.status != stats.OK]
        return missed


@dataclass(frozen=True)
class Step:
    """One rate the capacity search tried."""

    rate_tps: float
    ok: bool
    tps: float
    missed: list[str]


@dataclass(frozen=True)
class Removed:
    users: int = 0
    conversations: int = 0
    messages: int = 0
    runs: int = 0  # runs whose rows were removed
    running: int = 0  # runs still going, whose rows were left alone

    def __add__(self, other: Removed) -> Removed:
        return Removed(
            self.users + other.users,
            self.conversations + other.conversations,
            self.messages + other.messages,
            self.runs + other.runs,
            self.running + other.running,
        )


@dataclass
class BenchResult:
    request: BenchRequest
    budgets: list[Budget]
    mix: dict[str, int]  # as run: without what was left out
    left_out: dict[str, str]  # pattern -> why
    pgbench: str
    rate_tps: float  # the rate of the figures reported
    capacity_tps: float | None  # without --rate: the highest rate that held (None: none did)
    capacity_capped: bool  # the search stopped at --max-rate, still holding
    steps: list[Step]
    phases: list[Phase]
    key_cost_ms: float | None
    messages_estimate: int
    users_created: int
    removed: Removed  # bench's own rows, at the end
    leftovers: Removed  # rows of earlier runs that died, removed at the start

    @property
    def judged(self) -> Phase:
        """Budgets apply to the figures measured while the --while command ran, if any."""
        return self.phases[-1]

    @property
    def capacity_ok(self) -> bool:
        minimum = self.request.min_capacity
        if self.request.rate is not None:
            return True
        if minimum is None:
            return self.capacity_tps is not None
        return self.capacity_tps is not None and self.capacity_tps >= minimum

    @property
    def command_ok(self) -> bool:
        command = self.judged.command
        return command is None or command.exit_code == 0

    @property
    def ok(self) -> bool:
        return self.judged.ok and self.capacity_ok and self.command_ok
