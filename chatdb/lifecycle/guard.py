"""The guard: one lifecycle run (archive, archive restore, purge) per database at a time.

See docs/architecture.md, "The guard"."""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.exc import DBAPIError

from chatdb.errors import StateError
from chatdb.schema import chatdb_runs

#: The advisory lock that makes a run the only one: "chat", "life".
GUARD_KEY = (0x63686174, 0x6C696665)
#: A run that has not renewed its heartbeat for this long is reported as stalled.
STALLED_SECONDS = 60
#: How long a run waits for the server to end the session of a holder that died on this
#: machine a moment ago.
DEAD_HOLDER_WAIT = 5.0


@dataclass(frozen=True)
class _RunningRun:
    id: int
    command: str
    started_at: dt.datetime
    heartbeat_age: float
    db_user: str
    client_host: str | None
    client_pid: int | None

    def died_here(self) -> bool:
        """The run's process was on this machine and no longer exists."""
        if self.client_host != socket.gethostname()[:255] or not self.client_pid:
            return False
        try:
            os.kill(self.client_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        where = f" on {self.client_host}" if self.client_host else ""
        pid = f" (pid {self.client_pid})" if self.client_pid else ""
        return (
            f"{self.command} run {self.id}, started {self.started_at:%Y-%m-%d %H:%M:%S%z} by "
            f"{self.db_user}{where}{pid}, last heartbeat {_age(self.heartbeat_age)}"
            + (" (stalled?)" if self.heartbeat_age > STALLED_SECONDS else "")
        )


class Guard:
    """One lifecycle run per database at a time.

    The holder keeps a transaction open on a connection of its own holding a
    transaction-level advisory lock. The lock dies with the process: on a direct
    connection the server ends the session when the client's socket closes, and a
    transaction pooler closes a server connection whose client left mid-transaction. It
    needs no session state, so it works through PgBouncer in transaction mode. The
    transaction runs no query between heartbeats (READ COMMITTED, no snapshot held, no
    transaction id), so it does not hold back vacuum.

    The ``running`` row in ``chatdb_runs`` (one at most, by a unique partial index) says
    who holds the guard; its ``heartbeat_at`` is renewed with every batch. A run that
    finds the lock free and a ``running`` row left behind marks that row ``interrupted``.
    """

    def __init__(self, engine: Engine) -> None:
        self.connection = engine.connect()
        self.held = False

    def acquire(self, work: Connection) -> list[int]:
        """Take the guard; return the ids of dead runs marked interrupted."""
        deadline = time.monotonic() + DEAD_HOLDER_WAIT
        while not self.try_lock():
            running = _running_run(work)
            # A holder killed a moment ago on this machine: the server is about to notice
            # its closed socket and end its session, releasing the lock.
            if running is not None and running.died_here() and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            what = running.describe() if running else "another run is starting"
            raise StateError(
                f"another archive or purge run is in progress: {what}",
                hint="wait for it to finish; only one lifecycle run works on a database at a time",
            )
        self.held = True
        with work.begin():
            stale = (
                work.execute(
                    update(chatdb_runs)
                    .where(chatdb_runs.c.outcome == "running")
                    .values(
                        outcome="interrupted",
                        finished_at=func.now(),
                        error="the run ended without finishing (its process or connection died)",
                    )
                    .returning(chatdb_runs.c.id)
                )
                .scalars()
                .all()
            )
        return list(stale)

    def try_lock(self) -> bool:
        """Take the lock in a transaction left open on the guard's connection; False, with
        nothing held, when another session holds it. ``acquire`` does this and then marks
        the dead runs; called alone, it holds the lock as a run does, until ``release``."""
        guard = self.connection
        guard.begin()
        guard.execute(text("SELECT set_config('idle_in_transaction_session_timeout', '0', true)"))
        if guard.execute(text("SELECT pg_try_advisory_xact_lock(:a, :b)"), _guard_params()).scalar():
            return True
        guard.rollback()
        return False

    def check(self) -> None:
        """Prove the guard is still held (its connection alive), before a batch commits."""
        try:
            self.connection.execute(text("SELECT 1"))
        except DBAPIError:
            raise StateError(
                "lost the connection that holds the run's guard; stopped to keep runs from overlapping",
                hint="run the command again",
            ) from None

    def release(self) -> None:
        try:
            if self.held and self.connection.in_transaction():
                self.connection.rollback()
        except DBAPIError:
            pass
        finally:
            self.held = False
            self.connection.close()


def _age(seconds: float) -> str:
    """How long ago, in whole units: "0 s ago", "75 s ago", "12 min ago", "5 h ago"."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 120 * 60:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600:,} h ago"


def _guard_params() -> dict[str, int]:
    return {"a": GUARD_KEY[0], "b": GUARD_KEY[1]}


def _running_run(connection: Connection) -> _RunningRun | None:
    r = chatdb_runs.c
    with connection.begin():
        row = connection.execute(
            select(
                r.id,
                r.command,
                r.started_at,
                # The clock now, not this transaction's start, which may precede the
                # holder's last heartbeat.
                func.extract("epoch", func.clock_timestamp() - r.heartbeat_at),
                r.db_user,
                r.client_host,
                r.client_pid,
            ).where(r.outcome == "running")
        ).first()
    if row is None:
        return None
    return _RunningRun(row[0], row[1], row[2], float(row[3]), row[4], row[5], row[6])
