"""What doctor's checks return: findings, the thresholds they judge by, and the options of
a run. Plain data; nothing here touches a database."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from chatdb.defaults import DEAD_RATIO, DEAD_ROWS
from chatdb.errors import UsageError
from chatdb.units import size as size

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIPPED = "skipped"
STATUSES = (OK, WARN, FAIL, SKIPPED)

#: The areas, in the order reports show them.
AREAS = (
    "schema",
    "privileges",
    "vacuum",
    "bloat",
    "integrity",
    "indexes",
    "statements",
    "connections",
    "wraparound",
    "cache",
    "growth",
    "retention",
    "replication",
)


@dataclass(frozen=True)
class Finding:
    """One check of one object. ``value`` is what was measured and ``threshold`` what it
    was judged against, in ``unit`` (``bytes``, ``seconds``, ``rows``, ``ms``, ``ratio``,
    ``transactions``, ``connections``, ``scans``); ``fix`` is what to run, a psql script
    whose other lines are ``--`` comments."""

    area: str
    object: str | None
    check: str
    status: str
    value: Any = None
    threshold: Any = None
    detail: str = ""
    fix: str | None = None
    unit: str | None = None
    #: On Citus: the node (host:port) whose shards a finding judges; ``object`` then
    #: names it too. None for the coordinator's own objects, and for a table's figures
    #: summed over all its shards.
    node: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The shape of ``--json``'s ``checks`` (the unit is for people: README says which
        unit each check's value has)."""
        return {
            "area": self.area,
            "object": self.object,
            "check": self.check,
            "status": self.status,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
            "fix": self.fix,
            "node": self.node,
        }


# --- thresholds ---------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)
#: PostgreSQL's units (pg_size_bytes, pg_size_pretty): 1024-based, kB as it writes it.
_SIZE_UNITS = {"": 1, "b": 1, "bytes": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_size(raw: str, option: str) -> int:
    """A size as PostgreSQL writes one (``10GB``, ``512 MB``, ``1.5TB``, ``8kB``; units of
    1024), in bytes. Anything else is bad input."""
    match = _SIZE.fullmatch(raw)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise UsageError(f"{option}: {raw!r} is not a size (for example 10GB, 512MB or 1.5TB)")
    size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not 0 < size < 1 << 60:
        raise UsageError(f"{option}: {raw!r} is out of range")
    return math.ceil(size)


#: Thresholds that are shares of a whole.
_SHARES = {"dead_ratio", "bloat_ratio", "connections_warn", "connections_fail", "cache_hit_ratio"}


@dataclass(frozen=True)
class Thresholds:
    """What turns a measurement into a warning or a failure. Every one can be changed with
    ``chatdb doctor --threshold NAME=VALUE``."""

    #: A table needs VACUUM when its dead rows are at least this share of its rows...
    dead_ratio: float = DEAD_RATIO
    #: ... and at least this many (so a small table is not nagged about). Rows changed since
    #: the last ANALYZE are judged the same way.
    dead_rows: int = DEAD_ROWS
    #: Bloat: estimated wasted space at least this share of the relation's size...
    bloat_ratio: float = 0.4
    #: ... and at least this many bytes.
    bloat_bytes: int = 100 << 20
    #: A session idle in a transaction for longer than this (seconds) holds back vacuum.
    idle_in_transaction_seconds: float = 60
    #: A query running longer than this (seconds).
    long_query_seconds: float = 60
    #: A transaction (or prepared transaction) open longer than this (seconds).
    long_transaction_seconds: float = 600
    #: Connections in use, as a share of those available: warn from this share...
    connections_warn: float = 0.8
    #: ... and fail from this one.
    connections_fail: float = 0.95
    #: Transaction ID and multixact age, as a share of autovacuum_freeze_max_age (and of
    #: autovacuum_multixact_freeze_max_age), from which a table or database is overdue.
    wraparound_ratio: float = 1.0
    #: An age from which it fails: about 70% of the way to the 2^31 limit, where
    #: PostgreSQL stops assigning transaction IDs.
    wraparound_fail_age: int = 1_500_000_000
    #: Share of blocks found in shared_buffers below which the cache is too small.
    cache_hit_ratio: float = 0.99
    #: Fewer blocks than this read in all are too few to judge a ratio by.
    cache_min_blocks: int = 1000
    #: A statement whose mean time is above this (milliseconds) is slow.
    slow_statement_ms: float = 100
    #: How many statements, by total time, the report shows.
    statements_top: int = 10
    #: An inactive replication slot retaining more WAL than this (bytes).
    slot_retained_bytes: int = 1 << 30
    #: With --size-limit: warn when the limit is projected within this many days.
    size_limit_days: float = 90

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, assignments: list[str]) -> Thresholds:
        """These thresholds with ``NAME=VALUE`` assignments applied (sizes may carry a unit
        for the ``*_bytes`` ones). Unknown names and bad values are bad input."""
        changes: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for assignment in assignments:
            name, equals, raw = assignment.partition("=")
            name = name.strip().replace("-", "_")
            option = f"--threshold {assignment!r}"
            if not equals or name not in types:
                raise UsageError(f"{option}: expected NAME=VALUE, NAME one of {', '.join(self.names())}")
            if name.endswith("_bytes"):
                changes[name] = parse_size(raw, option) if raw.strip() not in ("0",) else 0
                continue
            whole = types[name] not in ("float", float)
            try:
                value = int(raw.strip()) if whole else float(raw)
            except ValueError:
                kind = "a whole number" if whole else "a number"
                raise UsageError(f"{option}: {raw!r} is not {kind}") from None
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"{option}: must be a number at least 0")
            if name in _SHARES and value > 1:
                raise UsageError(f"{option}: a share, between 0 and 1")
            changes[name] = value
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Options:
    """A doctor run: ``deep`` reads tables and indexes (pgstattuple, amcheck, exact
    retention counts); ``size_limit`` (bytes) is a plan's storage quota to project;
    ``older_than`` (seconds) the retention cutoff to look ahead at; ``record`` writes the
    tables' sizes to the history."""

    deep: bool = False
    size_limit: int | None = None
    older_than: Any = None  # a chatdb.lifecycle.Duration
    thresholds: Thresholds = field(default_factory=Thresholds)
    record: bool = True
    command: str = "doctor"


@dataclass
class Report:
    findings: list[Finding]
    database: str
    user: str
    server_version: str
    revision: str | None
    elapsed: float = 0.0
    #: What --deep read, in bytes (pgstattuple and amcheck), and how long it took.
    deep_read_bytes: int = 0
    deep_seconds: float = 0.0
    #: The growth series and projection (see chatdb.doctor.growth.Growth).
    growth: Any = None
    recorded: bool = False

    def count(self, status: str) -> int:
        return sum(finding.status == status for finding in self.findings)

    def failed(self, strict: bool = False) -> bool:
        return any(f.status == FAIL or (strict and f.status == WARN) for f in self.findings)


# --- words for details --------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A length of time in its largest whole unit: "45 s", "12 min", "5 h", "3 d"."""
    if seconds is None:
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds // 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600:.0f} h"
    return f"{seconds // 86400:,.0f} d"


def count(number: int, noun: str, plural: str | None = None) -> str:
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
