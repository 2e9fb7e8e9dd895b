"""One batch: one short transaction that locks a phase's next rows, deals with them, adds
its counts to the audit row, writes its export lines, and commits; tried again, smaller,
as the retry policy says.

The parts it puts together each read and test alone: the statements
(``statements``, ``phases``), the audit row (``audit``), the export file's side
(``export_session``) and the retry policy (``retry``). After a database error the
export file is put right first, and may forbid a retry; only then does the policy
decide. See docs/architecture.md, "One batch" and "Timeouts and retries"."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.exc import DBAPIError

from chatdb.errors import StateError, server_message
from chatdb.lifecycle import statements
from chatdb.lifecycle.audit import AuditRow
from chatdb.lifecycle.export import ExportFile
from chatdb.lifecycle.export_session import ExportSession
from chatdb.lifecycle.guard import Guard
from chatdb.lifecycle.models import SLOW_TRANSACTION_SECONDS, RunOptions
from chatdb.lifecycle.phases import Phase, Taken, export_lines
from chatdb.lifecycle.retry import Decision, RetryPolicy, sqlstate
from chatdb.lifecycle.sizing import fixed_cost, resized
from chatdb.lifecycle.statements import LOCK_TIMEOUT, STATEMENT_TIMEOUT
from chatdb.lifecycle.workers import RunState, Worker, advance

#: What to do about a batch that failed on every attempt, by the SQLSTATE of its last
#: failure: the lock conflicts name what may hold the lock (rows, or a whole table).
_LOCKED_HINT = (
    "another session held a lock these batches need (on rows or on a whole table; pg_locks and "
    "pg_stat_activity show which); run the command again later"
)
_GAVE_UP_HINTS: dict[str | None, str] = {"55P03": _LOCKED_HINT, "40P01": _LOCKED_HINT}


class Batches:
    """The batches of one run. ``export`` is the run's export file, if it has one; a
    phase that exports writes to it, one batch at a time."""

    def __init__(
        self,
        state: RunState,
        options: RunOptions,
        guard: Guard,
        audit: AuditRow,
        export: ExportFile | None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.state = state
        self.options = options
        self.guard = guard
        self.audit = audit
        self.export = export
        self.policy = policy or RetryPolicy()

    def run(self, worker: Worker, phase: Phase, after: Any) -> Taken:
        """One batch in one transaction, after the keyset position ``after`` (or in the
        window ``after``)."""
        connection = worker.connection
        exporting = phase.export and self.export is not None
        for attempt in range(1, self.policy.max_attempts + 1):
            started = time.monotonic()
            exported = 0
            session = self._session() if exporting else None
            limit = worker.size
            try:
                with connection.begin():
                    connection.execute(
                        statements.batch_settings(),
                        {
                            "lock": LOCK_TIMEOUT,
                            "statement": STATEMENT_TIMEOUT,
                            "commit": "on" if exporting or phase.durable else "off",
                        },
                    )
                    self.replan(worker, phase)
                    taken = phase.take(connection, limit, after)
                    if not taken.picked:
                        break
                    data = recorded = None
                    if session is not None:
                        data = session.file.encode(export_lines(connection, taken.ids, taken.users))
                        exported = len(taken.ids)
                        self.audit.record_intent(session.file.intent(data))
                        recorded = session.file.recorded(data)
                    self.audit.heartbeat(connection, taken.tally, exported, recorded)
                    if session is not None and data is not None:
                        session.write(data)
                    with self.state.lock:
                        if self.state.cancelled:
                            # Stopped at once after this batch's statements ran.
                            raise StateError("stopped at once; the batch in flight rolled back")
                        self.guard.check()
                    if session is not None:
                        session.commit()  # the block's end commits
                break
            except DBAPIError as exc:
                if session is not None and not session.failed(exc):
                    raise  # the lines may have committed, or could not be cut off
                decision = self.policy.decide(sqlstate(exc), attempt, self.state.cancelled)
                if decision is Decision.GIVE_UP:
                    attempts = self.policy.max_attempts
                    raise StateError(
                        f"{phase.name}: gave up after {attempts} attempts: {server_message(exc)}",
                        hint=_GAVE_UP_HINTS.get(sqlstate(exc), "run the command again later"),
                    ) from None
                if decision is Decision.RAISE:
                    raise
                worker.size = self.policy.smaller(worker.size)
                with self.state.lock:
                    self.state.result.retries += 1
                time.sleep(self.policy.backoff(attempt))
            except BaseException as exc:
                if session is not None:
                    session.failed(exc)
                raise
        elapsed = time.monotonic() - started
        if exported:
            assert session is not None
            session.committed()
        if phase.blocks is not None:
            advance(worker, after, taken, full=taken.picked == limit, elapsed=elapsed)
        if not taken.picked:
            return taken
        self._count(taken, elapsed, exported)
        worker.rows += taken.picked
        worker.timings[taken.picked] = min(worker.timings.get(taken.picked, elapsed), elapsed)
        if taken.picked == limit:
            # A short batch (the end of a pass or of a window) says little about the speed.
            worker.size = resized(
                worker.size, taken.picked, elapsed, self.options.batch_size, fixed_cost(worker.timings)
            )
        return taken

    def _count(self, taken: Taken, elapsed: float, exported: int) -> None:
        """Add a committed batch to the run's result, and show the progress."""
        result = self.state.result
        with self.state.lock:
            result.batches += 1
            result.longest_transaction_seconds = max(result.longest_transaction_seconds, elapsed)
            result.slow_transactions += elapsed > SLOW_TRANSACTION_SECONDS
            result.done.add(taken.tally)
            result.exported += exported
            if self.options.progress is not None:
                self.options.progress(result.done)

    def _session(self) -> ExportSession:
        assert self.export is not None
        return ExportSession(self.export, self.audit.committed_export_bytes, self._guard_held)

    def _guard_held(self) -> bool:
        """Whether this run still holds the guard, so that no other run appends to the
        export: the file is cut back only then (otherwise the next run sets it right)."""
        with self.state.lock:
            try:
                self.guard.check()
            except StateError:
                return False
        return True

    @staticmethod
    def replan(worker: Worker, phase: Phase) -> None:
        """Discard the session's cached plans each time the rows this worker has moved
        have doubled. The foreign-key check of every inserted row runs a plan cached in
        the session; one made while the target table was nearly empty scans that table
        whole, and goes on doing so as it grows, until autovacuum happens to analyse it
        (a first archive into empty archive tables ran four times slower)."""
        if phase.fills and worker.rows > 2 * worker.planned_at:
            worker.connection.execute(statements.discard_plans())
            worker.planned_at = worker.rows
