"""One batch's lines in the export file: written, then committed or failed.

A batch that exports records its intent (in a transaction of its own), adds its counts
and the file's new length to the audit row (in its own transaction), appends its lines
and fsyncs them, and only then commits. What it must do with the lines when it fails
depends on how far it got, and on what the error says of the COMMIT:

- nothing written yet: nothing to undo;
- written, failed before the COMMIT, or during it with an error that says it did not
  commit (a SQLSTATE of its own): the transaction rolled back; cut the lines off now, if
  the run still holds the guard (otherwise another run may have appended: the next run
  exporting to the file sets it right). Lines that could not be cut are never followed
  by a retry, which would write them again;
- written, and stopped during the COMMIT without learning its outcome (an error without
  SQLSTATE, or of class 08 or 57P; a signal): ask the database which length it
  committed, and keep or cut the lines accordingly.

See docs/architecture.md, "One batch" and "When a batch fails while the run is alive"."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import DBAPIError

from chatdb.lifecycle.export import ExportFile
from chatdb.lifecycle.retry import sqlstate


def outcome_unknown(code: str | None) -> bool:
    """Whether a COMMIT that raised an error with this SQLSTATE may still have committed:
    the connection broke, or the server was shutting the session down."""
    return code is None or code.startswith("08") or code.startswith("57P")


class ExportSession:
    """The export file's side of one attempt of one batch.

    ``committed_length()`` reads the file's length that the database committed, waiting
    briefly for the batch's transaction to end (a ``DBAPIError`` when it cannot tell);
    ``guard_held()`` says whether the run still holds the guard, so that no other run can
    have appended to the file."""

    def __init__(
        self,
        file: ExportFile,
        committed_length: Callable[[], int | None],
        guard_held: Callable[[], bool],
    ) -> None:
        self.file = file
        self.committed_length = committed_length
        self.guard_held = guard_held
        self.writing = False  # some of the lines may be in the file
        self.committing = False  # the COMMIT was sent, or is about to be

    def write(self, data: bytes) -> None:
        """Append the batch's lines after the committed length, durably."""
        self.writing = True
        self.file.write(data)

    def commit(self) -> None:
        """The batch's transaction is about to commit."""
        self.committing = True

    def committed(self) -> None:
        """The batch committed: its lines are part of the file."""
        self.file.committed()

    def failed(self, error: BaseException) -> bool:
        """The batch failed with ``error``: put the file right as far as this run can.
        False when no retry may follow, whatever the retry policy says: the lines may
        have committed, or they could not be cut off (or the error is not a database
        error, which is never retried)."""
        if not self.writing:
            return True
        if isinstance(error, DBAPIError):
            if self.committing and outcome_unknown(sqlstate(error)):
                self.settle()  # the batch may have committed
                return False
            return not (self.guard_held() and not self.file.undo())
        if self.committing:
            self.settle()  # interrupted during its COMMIT
        elif self.guard_held():
            self.file.undo()  # interrupted before it: rolled back
        return False

    def settle(self) -> None:
        """After a COMMIT whose outcome this process did not learn: keep the lines if the
        database committed them, cut them off if it did not. If that cannot be read, the
        file is left as it is, and the next run exporting to it sets it right."""
        try:
            committed = self.committed_length()
        except DBAPIError:
            return
        if self.guard_held():
            self.file.settle(committed)
