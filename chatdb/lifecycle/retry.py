"""The retry policy of a batch: which failures are tried again, how often, after how
long, and at which size. Pure decisions, no database (see docs/architecture.md,
"Timeouts and retries").

A batch that failed is tried again only when the policy says so *and* the export file
allows it (``chatdb.lifecycle.export_session``); the batch asks the file first."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

#: Attempts of one batch before a persistent lock conflict ends the run.
MAX_ATTEMPTS = 6

#: Retried: lock_not_available, deadlock_detected, serialization_failure, query_canceled
#: (statement_timeout; retried with a smaller batch), foreign_key_violation (a user
#: deleted while we copied their conversation).
RETRYABLE = frozenset({"55P03", "40P01", "40001", "57014", "23503"})


def sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of the server's error; None when there is none (a broken connection,
    an error of the driver)."""
    return getattr(exc.orig, "sqlstate", None)


class Decision(enum.Enum):
    RETRY = "retry"  # roll back, halve the batch, wait, try again
    RAISE = "raise"  # the error is the run's: raise it as it is
    GIVE_UP = "give up"  # retried MAX_ATTEMPTS times: stop the run, naming the phase


@dataclass(frozen=True)
class RetryPolicy:
    """What to do after the ``attempt``-th try of a batch failed with a database error."""

    max_attempts: int = MAX_ATTEMPTS
    retryable: frozenset[str] = RETRYABLE

    def decide(self, code: str | None, attempt: int, cancelled: bool) -> Decision:
        """``code`` is the error's SQLSTATE; ``cancelled`` says the run was stopped at
        once, which no retry follows."""
        if cancelled:
            return Decision.RAISE
        if code not in self.retryable:
            return Decision.RAISE
        if attempt == self.max_attempts:
            return Decision.GIVE_UP
        return Decision.RETRY

    @staticmethod
    def smaller(size: int) -> int:
        """The size of the batch tried again: half, at least one row."""
        return max(1, size // 2)

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds to wait before trying again after the ``attempt``-th try: 0.2 s,
        doubling, at most 3 s."""
        return min(0.1 * 2**attempt, 3.0)
