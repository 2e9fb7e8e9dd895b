"""A run from start to end: take the guard, put the export file right, open the audit
row, drain each phase with the workers, record the outcome, release the guard.

See docs/architecture.md, "A run, step by step"."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, cast, insert, select, text
from sqlalchemy.exc import DBAPIError

from chatdb import db
from chatdb.errors import StateError, one_line
from chatdb.lifecycle import statements
from chatdb.lifecycle.export import ExportFile
from chatdb.lifecycle.guard import Guard
from chatdb.lifecycle.models import SLOW_TRANSACTION_SECONDS, Plan, RunOptions, RunResult, Tally
from chatdb.lifecycle.phases import Phase, Taken, export_lines, tid
from chatdb.lifecycle.planning import remaining
from chatdb.lifecycle.sizing import FIRST_BATCH_SIZE, FIRST_WINDOW_BLOCKS, MAX_WINDOW_BLOCKS, resized
from chatdb.lifecycle.statements import LOCK_TIMEOUT, STATEMENT_TIMEOUT
from chatdb.schema import chatdb_runs

SETTLE_TIMEOUT = "2s"  # waiting to learn whether an interrupted COMMIT committed
#: Attempts of one batch before a persistent lock conflict ends the run.
MAX_ATTEMPTS = 6
#: Sweeps that find every remaining row locked by another session before the run gives up.
MAX_LOCKED_SWEEPS = 8

#: Retried: lock_not_available, deadlock_detected, serialization_failure, query_canceled
#: (statement_timeout; retried with a smaller batch), foreign_key_violation (a user
#: deleted while we copied their conversation).
_RETRYABLE = {"55P03", "40P01", "40001", "57014", "23503"}


@dataclass
class _Pass:
    """One pass over a phase by the run's workers, sharing one keyset position (or, going
    through a table in physical order, the next block no worker has claimed yet)."""

    after: tuple | None = None
    next_block: int = 0
    end_block: int = 0
    rows: int = 0
    over: bool = False
    failure: BaseException | None = None


@dataclass
class _Worker:
    connection: Connection
    size: int
    rows: int = 0  # rows this worker has handled in the run
    planned_at: int = 0  # ``rows`` when this worker's session last discarded its plans
    blocks: int = FIRST_WINDOW_BLOCKS  # the size of the next window it claims
    window: tuple[str, int] | None = None  # (after ctid, end block) of its claimed window


_EXPORT_BYTES = cast(chatdb_runs.c.counts["export_bytes"].as_string(), BigInteger)
_HEARTBEAT = text(
    # The batch that commits this is the one its run recorded it was about to export.
    "UPDATE chatdb_runs SET heartbeat_at = now(), counts = (counts - 'export_pending') || jsonb_build_object("
    " 'conversations', coalesce((counts->>'conversations')::bigint, 0) + :conversations,"
    " 'messages', coalesce((counts->>'messages')::bigint, 0) + :messages,"
    " 'archive_conversations', coalesce((counts->>'archive_conversations')::bigint, 0)"
    "   + :archive_conversations,"
    " 'archive_messages', coalesce((counts->>'archive_messages')::bigint, 0) + :archive_messages,"
    " 'exported', coalesce((counts->>'exported')::bigint, 0) + :exported)"
    " || jsonb_strip_nulls(jsonb_build_object("
    "  'export_bytes', CAST(:export_bytes AS bigint), 'export_tail', CAST(:export_tail AS text)))"
    " WHERE id = :id AND outcome = 'running'"
)
_INTENT = text(
    "UPDATE chatdb_runs SET counts = counts || jsonb_build_object('export_pending', CAST(:intent AS jsonb))"
    " WHERE id = :id AND outcome = 'running'"
)
_CLOSE = text(
    "UPDATE chatdb_runs SET outcome = :outcome, finished_at = now(), error = :error,"
    " counts = counts || CAST(:extra AS jsonb) WHERE id = :id"
)


class Runner:
    """Runs the phases of one command with ``jobs`` workers, each on a connection of its
    own. The workers of a pass share one keyset position: each locks the next batch after
    it, and SKIP LOCKED passes over the batches the others hold."""

    def __init__(self, engine: Engine, plan: Plan, options: RunOptions, export: ExportFile | None) -> None:
        self.engine = engine
        self.plan = plan
        self.options = options
        self.export = export
        # Export batches are appended (and cut off again on failure) one at a time.
        self.jobs = 1 if export is not None else options.jobs
        self.started = time.monotonic()
        self.deadline = self.started + options.max_runtime.seconds if options.max_runtime else None
        self.result = RunResult(plan.command, None, plan, jobs=self.jobs)
        self.lock = threading.Lock()
        self.connection: Connection | None = None
        self.workers: list[_Worker] = []
        self.cancelled = False  # the batches in flight were cancelled: no retry

    # The run --------------------------------------------------------------------------

    def run(self, phases: Sequence[Phase]) -> RunResult:
        guard = Guard(self.engine)
        extra: list[Connection] = []
        try:
            with self.engine.connect() as connection:
                self.connection = connection
                self.result.took_over = guard.acquire(connection)
                self.guard = guard
                if self.export is not None:
                    self.export.repair(*self._exported_before(connection))
                self.result.run_id = self._open_run()
                try:
                    extra = [self.engine.connect() for _ in range(self.jobs - 1)]
                    first = min(self.options.batch_size, FIRST_BATCH_SIZE)
                    self.workers = [_Worker(c, first) for c in (connection, *extra)]
                    for phase in phases:
                        if not self._drain(phase):
                            break
                except BaseException as exc:
                    self.result.complete = False
                    self._close_run("failed" if isinstance(exc, Exception) else "interrupted", exc)
                    raise
                self._close_run(self.result.outcome, None)
        finally:
            for connection in extra:
                connection.close()
            guard.release()
            self.result.elapsed_seconds = time.monotonic() - self.started
        return self.result

    def _stop_reason(self) -> str | None:
        reason = self.options.should_stop()
        if reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            reason = "max-runtime"
        return reason

    def _drain(self, phase: Phase) -> bool:
        """Work through one phase; False when the run was asked to stop."""
        locked_sweeps = 0
        while True:
            rows = self._pass(phase)
            if self.result.stopped_by is not None:
                return False
            if not self._pending(phase):
                return True
            if rows:
                locked_sweeps = 0
            else:
                # A pass from the start found only rows that other sessions hold.
                locked_sweeps += 1
                if locked_sweeps > MAX_LOCKED_SWEEPS:
                    raise StateError(
                        f"{phase.name}: some rows stayed locked by other sessions and were left as they are",
                        hint="run the command again later; `chatdb status` shows this run",
                    )
                time.sleep(min(0.05 * 2**locked_sweeps, 2.0))
            # Pass again from the start for the rows skipped as locked.

    def _pass(self, phase: Phase) -> int:
        state = _Pass()
        if phase.blocks is not None:
            # Blocks added later hold rows written since: a sweep after this pass finds
            # any that match.
            assert self.connection is not None
            with self.connection.begin():
                state.end_block = self.connection.execute(
                    statements.relation_blocks(),
                    {"table": phase.blocks.name},
                ).scalar_one()
            for worker in self.workers:
                worker.window = None
        if len(self.workers) == 1:
            self._work(self.workers[0], phase, state)
            return state.rows
        # Each worker says when it is done. Not Thread.join: on Python 3.11 a join that
        # a signal interrupts leaves the thread marked stopped while it still runs.
        finished = [threading.Event() for _ in self.workers]

        def work(worker: _Worker, done: threading.Event) -> None:
            try:
                self._work(worker, phase, state)
            finally:
                done.set()

        started: list[threading.Event] = []
        try:
            for worker, done in zip(self.workers, finished, strict=True):
                threading.Thread(target=work, args=(worker, done), daemon=True).start()
                started.append(done)
            for done in started:
                while not done.wait(0.1):  # wakes up for signals
                    pass
        except BaseException:
            # Stopping at once: cancel the batches in flight (they roll back).
            with self.lock:
                state.over = True
                self.cancelled = True
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    worker.connection.connection.dbapi_connection.cancel()  # type: ignore[union-attr]
            # The run closes once no worker uses its connections any more: the cancelled
            # batches end at once. (A third signal cuts this short: the process exits,
            # and a batch not yet committing rolls back with its connection.)
            for done in started:
                done.wait()
            raise
        if state.failure is not None:
            raise state.failure
        return state.rows

    def _work(self, worker: _Worker, phase: Phase, state: _Pass) -> None:
        try:
            while True:
                with self.lock:
                    if state.over:
                        return
                    reason = self._stop_reason()
                    if reason is not None:
                        self.result.stopped_by = reason
                        self.result.complete = False
                        state.over = True
                        return
                    if phase.blocks is None:
                        position: Any = state.after
                    elif (position := self._claim(worker, state)) is None:
                        return  # the table is done; the other workers finish their windows
                taken = self._batch(worker, phase, position)
                with self.lock:
                    state.rows += taken.picked
                    if phase.blocks is not None:
                        continue
                    if not taken.picked:
                        state.over = True
                        return
                    if state.after is None or taken.last > state.after:
                        state.after = taken.last
        except BaseException as exc:
            with self.lock:
                state.over = True
                state.failure = state.failure or exc
            if len(self.workers) == 1:
                raise

    @staticmethod
    def _claim(worker: _Worker, state: _Pass) -> tuple[str, int] | None:
        """The worker's window of blocks: the rest of the one it holds, or the next
        ``worker.blocks`` blocks no worker has claimed; None once the table is done."""
        if worker.window is None:
            if state.next_block >= state.end_block:
                return None
            start = state.next_block
            state.next_block = start + worker.blocks
            worker.window = (f"({start},0)", state.next_block)
        return worker.window

    def _pending(self, phase: Phase) -> bool:
        assert self.connection is not None
        with self.connection.begin():
            return bool(self.connection.execute(phase.pending).scalar())

    def _batch(self, worker: _Worker, phase: Phase, after: Any) -> Taken:
        """One batch in one transaction, after the keyset position ``after`` (or in the
        window ``after``)."""
        connection = worker.connection
        for attempt in range(1, MAX_ATTEMPTS + 1):
            started = time.monotonic()
            exported = 0
            writing = committing = False
            limit = worker.size
            try:
                with connection.begin():
                    connection.execute(
                        statements.batch_settings(),
                        {
                            "lock": LOCK_TIMEOUT,
                            "statement": STATEMENT_TIMEOUT,
                            "commit": "on" if phase.export and self.export is not None else "off",
                        },
                    )
                    self._replan(worker, phase)
                    taken = phase.take(connection, limit, after)
                    if not taken.picked:
                        break
                    data = None
                    if phase.export and self.export is not None:
                        data = self.export.encode(export_lines(connection, taken.ids, taken.users))
                        exported = len(taken.ids)
                        self._record_intent(data)
                    self._heartbeat(connection, taken.tally, exported, data)
                    if data is not None:
                        assert self.export is not None
                        writing = True
                        self.export.write(data)
                    with self.lock:
                        if self.cancelled:
                            # Stopped at once after this batch's statements ran.
                            raise StateError("stopped at once; the batch in flight rolled back")
                        self.guard.check()
                    committing = True  # the block's end commits
                break
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None)
                if writing:
                    assert self.export is not None
                    if committing and _outcome_unknown(code):
                        self._settle_export()  # the batch may have committed
                        raise
                    if self._guard_held() and not self.export.undo():
                        raise  # no retry after lines that could not be cut off
                if self.cancelled:
                    raise
                if code not in _RETRYABLE or attempt == MAX_ATTEMPTS:
                    if code in _RETRYABLE:
                        raise StateError(
                            f"{phase.name}: gave up after {MAX_ATTEMPTS} attempts: {one_line(exc)}",
                            hint="another session keeps these rows locked; run the command again later",
                        ) from None
                    raise
                worker.size = max(1, worker.size // 2)
                with self.lock:
                    self.result.retries += 1
                time.sleep(min(0.1 * 2**attempt, 3.0))
            except BaseException:
                if writing:
                    assert self.export is not None
                    if committing:
                        self._settle_export()  # interrupted during its COMMIT
                    elif self._guard_held():
                        self.export.undo()  # interrupted before it: rolled back
                raise
        elapsed = time.monotonic() - started
        if exported:
            assert self.export is not None
            self.export.committed()
        if phase.blocks is not None:
            self._advance(worker, after, taken, full=taken.picked == limit, elapsed=elapsed)
        if not taken.picked:
            return taken
        with self.lock:
            self.result.batches += 1
            self.result.longest_transaction_seconds = max(self.result.longest_transaction_seconds, elapsed)
            self.result.slow_transactions += elapsed > SLOW_TRANSACTION_SECONDS
            self.result.done.add(taken.tally)
            self.result.exported += exported
            if self.options.progress is not None:
                self.options.progress(self.result.done)
        worker.rows += taken.picked
        if taken.picked == limit:
            # A short batch (the end of a pass or of a window) says little about the speed.
            worker.size = resized(worker.size, taken.picked, elapsed, self.options.batch_size)
        return taken

    @staticmethod
    def _advance(worker: _Worker, window: tuple[str, int], taken: Taken, full: bool, elapsed: float) -> None:
        """After a batch in the worker's window: a full batch leaves the rest of the
        window for the next one; otherwise the window is done, and the next one is
        sized by how long this one took."""
        after, end = window
        if full and taken.last is not None:
            worker.window = (taken.last, end)
            return
        worker.window = None
        if not full:
            covered = end - tid(after)[0]
            worker.blocks = resized(worker.blocks, covered, elapsed, MAX_WINDOW_BLOCKS)

    @staticmethod
    def _replan(worker: _Worker, phase: Phase) -> None:
        """Discard the session's cached plans each time the rows this worker has moved
        have doubled. The foreign-key check of every inserted row runs a plan cached in
        the session; one made while the target table was nearly empty scans that table
        whole, and goes on doing so as it grows, until autovacuum happens to analyse it
        (a first archive into empty archive tables ran four times slower)."""
        if phase.fills and worker.rows > 2 * worker.planned_at:
            worker.connection.execute(statements.discard_plans())
            worker.planned_at = worker.rows

    # The audit row --------------------------------------------------------------------

    def _open_run(self) -> int:
        connection = self.connection
        assert connection is not None
        counts: dict[str, Any] = {**Tally().as_dict(), "exported": 0}
        if self.plan.counts is not None:
            counts["planned"] = self.plan.counts.as_dict()
        if self.plan.deleted_cutoff is not None:
            counts["deleted_cutoff"] = self.plan.deleted_cutoff.isoformat()
        if self.export is not None:
            counts.update(self.export.identity, **self.export.recorded(b""))
        with connection.begin():
            # What the run records of its export file (its length now, the start it may
            # be cut back to) must outlive a crash of the server: committed for good.
            connection.execute(text("SELECT set_config('synchronous_commit', 'on', true)"))
            return connection.execute(
                insert(chatdb_runs)
                .values(
                    command=self.plan.command,
                    arguments=_masked(self.options.arguments),
                    cutoff=self.plan.cutoff,
                    client_host=socket.gethostname()[:255],
                    client_pid=os.getpid(),
                    counts=counts,
                )
                .returning(chatdb_runs.c.id)
            ).scalar_one()

    def _settle_export(self) -> None:
        """After a COMMIT whose outcome this process did not learn: wait (briefly) for the
        batch's transaction to end, by locking the run's row that the batch updated, and
        cut the export back to the length the database committed. If that cannot be
        read, the file is left as it is, and the next run exporting to it sets it right."""
        assert self.export is not None
        try:
            with self.engine.connect() as connection, connection.begin():
                connection.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": SETTLE_TIMEOUT})
                committed = connection.execute(
                    select(_EXPORT_BYTES)
                    .where(chatdb_runs.c.id == self.result.run_id)
                    .with_for_update(read=True)
                ).scalar_one()
        except DBAPIError:
            return
        if self._guard_held():
            self.export.settle(committed)

    def _guard_held(self) -> bool:
        """Whether this run still holds the guard, so that no other run appends to the
        export: the file is cut back only then (otherwise the next run sets it right)."""
        with self.lock:
            try:
                self.guard.check()
            except StateError:
                return False
        return True

    def _exported_before(self, connection: Connection) -> tuple[int | None, str | None, dict | None]:
        """What the last run exporting to the same path recorded of the file it committed
        (its length and the hash of its last bytes), and of the batch it was about to
        append when it recorded them last (see ExportFile.intent), if any."""
        assert self.export is not None
        counts = chatdb_runs.c.counts
        with connection.begin():
            row = connection.execute(
                select(
                    _EXPORT_BYTES,
                    counts["export_tail"].as_string(),
                    counts["export_pending"],
                )
                .where(counts["export_path"].as_string() == self.export.identity["export_path"])
                .order_by(chatdb_runs.c.id.desc())
                .limit(1)
            ).first()
        return (None, None, None) if row is None else (row[0], row[1], row[2])

    def _record_intent(self, data: bytes) -> None:
        """Before a batch's lines reach the export file, record durably, in a transaction
        of its own, what the run is about to append after the committed length: if the
        batch never commits, the next run can tell those bytes from any others, even in
        a file that was empty. The batch's own transaction clears it (_HEARTBEAT)."""
        assert self.export is not None
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT set_config('synchronous_commit', 'on', true),"
                    " set_config('lock_timeout', :lock, true)"
                ),
                {"lock": LOCK_TIMEOUT},
            )
            recorded = connection.execute(
                _INTENT, {"intent": json.dumps(self.export.intent(data)), "id": self.result.run_id}
            ).rowcount
        if not recorded:
            raise StateError(
                f"run {self.result.run_id} is no longer marked running in chatdb_runs; stopped",
                hint="another run may have taken over; see `chatdb status`",
            )

    def _heartbeat(self, connection: Connection, tally: Tally, exported: int, data: bytes | None) -> None:
        """Renew the run's heartbeat and add the batch's counts, in the batch's own
        transaction: the audit row counts exactly what was committed, and records how long
        the export file is with this batch's ``data`` in it."""
        params = {**tally.as_dict(), "exported": exported, "id": self.result.run_id}
        params |= {"export_bytes": None, "export_tail": None}
        if data is not None:
            assert self.export is not None
            params |= self.export.recorded(data)
        renewed = connection.execute(_HEARTBEAT, params).rowcount
        if not renewed:
            raise StateError(
                f"run {self.result.run_id} is no longer marked running in chatdb_runs; stopped",
                hint="another run may have taken over; see `chatdb status`",
            )

    def _close_run(self, outcome: str, exc: BaseException | None) -> None:
        if self.result.run_id is None:
            return
        error = None
        if exc is not None:
            error = exc.message if isinstance(exc, StateError) else one_line(exc) or type(exc).__name__
        if exc is None and not self.result.complete:
            self.result.remaining = remaining(self.engine, self.plan)
        extra: dict[str, Any] = {"complete": self.result.complete}
        if self.result.stopped_by:
            extra["stopped_by"] = self.result.stopped_by
        if self.result.remaining is not None:
            extra["remaining"] = self.result.remaining.as_dict()
        params = {
            "outcome": outcome,
            "error": error,
            "extra": json.dumps(extra),
            "id": self.result.run_id,
        }

        def close(connection: Connection) -> None:
            # A batch stuck in its COMMIT holds the row: rather than wait for it for ever,
            # the run is left `running`, and the next run marks it interrupted.
            connection.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": SETTLE_TIMEOUT})
            connection.execute(_CLOSE, params)

        try:
            assert self.connection is not None
            if self.connection.in_transaction():
                self.connection.rollback()
            with self.connection.begin():
                close(self.connection)
        except DBAPIError:
            # The run's connection is gone (or the row stayed locked): try once more on
            # a connection of its own; failing that, the next run marks this one.
            try:
                with self.engine.begin() as connection:
                    close(connection)
            except DBAPIError:
                return
        self.options.recorded()


def _outcome_unknown(sqlstate: str | None) -> bool:
    """Whether a COMMIT that raised this error may still have committed: the connection
    broke, or the server was shutting the session down."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate.startswith("57P")


def _masked(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key: db.mask_text(value) if isinstance(value, str) else value for key, value in arguments.items()}
