"""The run's workers and their passes over a phase.

``jobs`` workers, each on a connection of its own, take batches until the phase's rows
are behind them (a pass); while rows still match after a pass (skipped as locked, moved,
or added behind the position), they pass again from the start (a sweep). See
docs/architecture.md, "Rows skipped, and visited again", and "Stopping" for what a
signal does to the workers' threads."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from chatdb.lifecycle import statements
from chatdb.lifecycle.models import RunResult
from chatdb.lifecycle.phases import Phase, Taken, tid
from chatdb.lifecycle.sizing import FIRST_WINDOW_BLOCKS, MAX_WINDOW_BLOCKS, resized

#: Sweeps that find every remaining row locked by another session before the run gives up.
MAX_LOCKED_SWEEPS = 8
#: ``RunResult.stopped_by`` when the rows left stayed locked by other sessions.
LOCKED = "locked"


@dataclass
class RunState:
    """What the threads of one run share, under ``lock``: the result being added up, and
    whether the batches in flight were cancelled (stopped at once: no retry)."""

    result: RunResult
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    #: A phase left rows that other sessions held (see ``Workers.drain``).
    locked: bool = False


@dataclass
class Pass:
    """One pass over a phase by the run's workers, sharing one keyset position (or, going
    through a table in physical order, the next block no worker has claimed yet)."""

    after: tuple | None = None
    next_block: int = 0
    end_block: int = 0
    rows: int = 0
    over: bool = False
    failure: BaseException | None = None


@dataclass
class Worker:
    connection: Connection
    size: int
    rows: int = 0  # rows this worker has handled in the run
    #: The shortest time (seconds) of each size of batch that took rows in the run, for
    #: what a batch costs whatever its size (``sizing.fixed_cost``).
    timings: dict[int, float] = field(default_factory=dict)
    planned_at: int = 0  # ``rows`` when this worker's session last discarded its plans
    blocks: int = FIRST_WINDOW_BLOCKS  # the size of the next window it claims
    window: tuple[str, int] | None = None  # (after ctid, end block) of its claimed window


def claim(worker: Worker, state: Pass) -> tuple[str, int] | None:
    """The worker's window of blocks: the rest of the one it holds, or the next
    ``worker.blocks`` blocks no worker has claimed; None once the table is done."""
    if worker.window is None:
        if state.next_block >= state.end_block:
            return None
        start = state.next_block
        state.next_block = start + worker.blocks
        worker.window = (f"({start},0)", state.next_block)
    return worker.window


def advance(worker: Worker, window: tuple[str, int], taken: Taken, full: bool, elapsed: float) -> None:
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


#: ``batch(worker, phase, after)``: one batch of the phase after the keyset position (or
#: in the window) ``after``, in one transaction (see Batches.run).
Batch = Callable[[Worker, Phase, Any], Taken]


class Workers:
    """Runs the phases of one command with a worker per connection. The workers of a
    pass share one keyset position: each locks the next batch after it, and SKIP LOCKED
    passes over the batches the others hold. ``stop_reason()`` says when the run was
    asked to stop (before each batch)."""

    def __init__(
        self,
        connections: Sequence[Connection],
        first_size: int,
        state: RunState,
        batch: Batch,
        stop_reason: Callable[[], str | None],
    ) -> None:
        self.connection = connections[0]  # the run's own, which also reads the passes' ends
        self.workers = [Worker(connection, first_size) for connection in connections]
        self.state = state
        self.batch = batch
        self.stop_reason = stop_reason

    def drain(self, phase: Phase) -> bool:
        """Work through one phase; False when the run was asked to stop."""
        locked_sweeps = 0
        while True:
            rows = self._pass(phase)
            if self.state.result.stopped_by is not None:
                return False
            if not self._pending(phase):
                return True
            if rows:
                locked_sweeps = 0
            else:
                # A pass from the start found only rows that other sessions hold.
                locked_sweeps += 1
                if locked_sweeps > MAX_LOCKED_SWEEPS:
                    # What is left of this phase, other sessions hold: the run goes on to
                    # the next phases, and then ends as a stop does (``finish``), with
                    # what it did counted and recorded; a later run takes the rest.
                    self.state.locked = True
                    return True
                time.sleep(min(0.05 * 2**locked_sweeps, 2.0))
            # Pass again from the start for the rows skipped as locked.

    def finish(self) -> None:
        """After the last phase: a run that left rows other sessions held is stopped
        (``LOCKED``), not complete."""
        result = self.state.result
        if self.state.locked and result.stopped_by is None:
            result.stopped_by = LOCKED
            result.complete = False

    def _pass(self, phase: Phase) -> int:
        state = Pass()
        if phase.blocks is not None:
            # Blocks added later hold rows written since: a sweep after this pass finds
            # any that match.
            with self.connection.begin():
                state.end_block = self.connection.execute(
                    statements.relation_blocks(), {"table": phase.blocks.name}
                ).scalar_one()
            for worker in self.workers:
                worker.window = None
        if phase.starts is not None:
            with self.connection.begin():
                phase.starts(self.connection)
        if len(self.workers) == 1:
            self._work(self.workers[0], phase, state)
            return state.rows
        # Each worker says when it is done. Not Thread.join: on Python 3.11 a join that
        # a signal interrupts leaves the thread marked stopped while it still runs.
        finished = [threading.Event() for _ in self.workers]

        def work(worker: Worker, done: threading.Event) -> None:
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
            with self.state.lock:
                state.over = True
                self.state.cancelled = True
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

    def _work(self, worker: Worker, phase: Phase, state: Pass) -> None:
        lock = self.state.lock
        result = self.state.result
        try:
            while True:
                with lock:
                    if state.over:
                        return
                    reason = self.stop_reason()
                    if reason is not None:
                        result.stopped_by = reason
                        result.complete = False
                        state.over = True
                        return
                    if phase.blocks is None:
                        position: Any = state.after
                    elif (position := claim(worker, state)) is None:
                        return  # the table is done; the other workers finish their windows
                taken = self.batch(worker, phase, position)
                with lock:
                    state.rows += taken.picked
                    if phase.blocks is not None:
                        continue
                    if not taken.picked and taken.last is None:
                        state.over = True
                        return
                    if state.after is None or taken.last > state.after:
                        state.after = taken.last
        except BaseException as exc:
            with lock:
                state.over = True
                state.failure = state.failure or exc
            if len(self.workers) == 1:
                raise

    def _pending(self, phase: Phase) -> bool:
        with self.connection.begin():
            return bool(self.connection.execute(phase.pending).scalar())
