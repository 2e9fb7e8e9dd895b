"""What ``chatdb verify-indexes`` reports: the checks' names and statuses, a check, and
the report. ``chatdb.indexes`` runs the checks of one server and ``chatdb.index_shards``
those of a Citus cluster's shards; both speak this vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field

OK = "ok"
FAIL = "fail"

#: The names of the checks, as reports show them.
REVISION = "revision"
TABLE = "table"
PRESENT = "present"
DEFINITION = "definition"
VALID = "valid"
UNEXPECTED = "unexpected"
DUPLICATE = "duplicate"
REDUNDANT = "redundant"
FOREIGN_KEY = "foreign key"
QUERY = "query"
#: On Citus: how a table is distributed, and the indexes of each of its shard placements.
DISTRIBUTION = "distribution"
SHARDS = "shards"


@dataclass(frozen=True)
class Check:
    """One check that ran: ``status`` is ``ok`` or ``fail``; ``fix`` says what to run."""

    table: str | None
    index: str | None
    check: str
    status: str
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass(frozen=True)
class VerifyReport:
    current: str | None
    head: str
    checks: list[Check] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def findings(self) -> list[Check]:
        return [check for check in self.checks if check.failed]

    @property
    def ok(self) -> bool:
        return not self.findings
