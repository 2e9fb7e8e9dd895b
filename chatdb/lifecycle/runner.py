"""A run from start to end: take the guard, put the export file right, open the audit
row, drain each phase with the workers, record the outcome, release the guard.

See docs/architecture.md, "A run, step by step"."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine

from chatdb.errors import StateError, one_line
from chatdb.lifecycle import audit
from chatdb.lifecycle.audit import AuditRow
from chatdb.lifecycle.batch import Batches
from chatdb.lifecycle.export import ExportFile
from chatdb.lifecycle.guard import Guard
from chatdb.lifecycle.models import Plan, RunOptions, RunResult
from chatdb.lifecycle.phases import Phase
from chatdb.lifecycle.planning import remaining
from chatdb.lifecycle.sizing import FIRST_BATCH_SIZE
from chatdb.lifecycle.workers import RunState, Workers


class Runner:
    """Runs the phases of one command with ``jobs`` workers, each on a connection of its
    own (one when the run exports: export batches are appended, and cut off again on
    failure, one at a time)."""

    def __init__(self, engine: Engine, plan: Plan, options: RunOptions, export: ExportFile | None) -> None:
        self.engine = engine
        self.plan = plan
        self.options = options
        self.export = export
        self.jobs = 1 if export is not None else options.jobs
        self.started = time.monotonic()
        self.deadline = self.started + options.max_runtime.seconds if options.max_runtime else None
        self.state = RunState(RunResult(plan.command, None, plan, jobs=self.jobs))
        self.audit = AuditRow(engine)

    def run(self, phases: Sequence[Phase]) -> RunResult:
        result = self.state.result
        guard = Guard(self.engine)
        extra: list[Connection] = []
        try:
            with self.engine.connect() as connection:
                result.took_over = guard.acquire(connection)
                if self.export is not None:
                    path = self.export.identity["export_path"]
                    self.export.repair(*audit.exported_before(connection, path))
                result.run_id = self.audit.open(connection, self.plan, self.options.arguments, self._export())
                try:
                    extra = [self.engine.connect() for _ in range(self.jobs - 1)]
                    first = min(self.options.batch_size, FIRST_BATCH_SIZE)
                    batches = Batches(self.state, self.options, guard, self.audit, self.export)
                    workers = Workers([connection, *extra], first, self.state, batches.run, self._stop_reason)
                    for phase in phases:
                        if not workers.drain(phase):
                            break
                    workers.finish()
                    self._settle()
                except BaseException as exc:
                    result.complete = False
                    self._close(connection, "failed" if isinstance(exc, Exception) else "interrupted", exc)
                    raise
                self._close(connection, result.outcome, None)
        finally:
            for other in extra:
                other.close()
            guard.release()
            result.elapsed_seconds = time.monotonic() - self.started
        return result

    def _export(self) -> dict[str, Any]:
        """What the audit row records of the export file at the start: which file, and its
        length and tail as the repair left them."""
        if self.export is None:
            return {}
        return {**self.export.identity, **self.export.recorded(b"")}

    def _stop_reason(self) -> str | None:
        reason = self.options.should_stop()
        if reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            reason = "max-runtime"
        return reason

    def _settle(self) -> None:
        """The run's outcome, decided as it is about to be recorded: a stop asked for
        after the last check of the workers (a signal while the run found that nothing was
        left) stops the run as it would have after the batch in flight, and one asked for
        from now on changes nothing (``options.recording``). What is left is counted first,
        when the run stopped early, while a second signal can still stop that count."""
        result = self.state.result
        if not result.complete:
            result.remaining = remaining(self.engine, self.plan)
        reason = self.options.recording()
        if reason is not None and result.stopped_by is None:
            result.stopped_by = reason
            result.complete = False
            result.remaining = remaining(self.engine, self.plan)

    def _close(self, connection: Connection, outcome: str, exc: BaseException | None) -> None:
        result = self.state.result
        if result.run_id is None:
            return
        error = None
        if exc is not None:
            error = exc.message if isinstance(exc, StateError) else one_line(exc) or type(exc).__name__
        extra: dict[str, Any] = {"complete": result.complete}
        if result.stopped_by:
            extra["stopped_by"] = result.stopped_by
        if result.remaining is not None:
            extra["remaining"] = result.remaining.as_dict()
        if self.audit.close(connection, outcome, error, extra):
            self.options.recorded()
