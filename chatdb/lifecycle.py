"""``chatdb archive`` and ``chatdb purge``: cold storage and retention, in short batches.

hot tables -> archive (``archive``) -> gone (``purge``). A conversation always moves or
goes whole, with all its messages. The rules that keep other people's data safe:

- The cutoff is taken once, from the database clock, before the first batch
  (``now() - make_interval(secs => N)``: exact seconds, whatever the session's time zone).
- Each batch is one short transaction. Its conversations are locked with
  ``FOR UPDATE SKIP LOCKED`` by a query whose WHERE clause PostgreSQL re-checks on the
  newest row version once the lock is granted, so a conversation that just received a
  message (the application bumps ``updated_at`` in the same transaction) is never taken.
  Adding a message takes a ``FOR KEY SHARE`` lock on its conversation, which conflicts
  with our ``FOR UPDATE``: a conversation being written to is skipped, and no message can
  be added to one we hold.
- Idle conversations go in physical order, windows of table blocks one after another;
  soft-deleted rows and restores in keyset order through an index. Either way a run
  never rescans the dead tuples of earlier batches, and rows skipped because another
  session held them (or moved, in physical order) are visited again by a sweep from the
  start before the run ends.
- ``lock_timeout`` and ``statement_timeout`` on every batch; lock and statement timeouts,
  deadlocks, serialization failures and a foreign-key violation (a user deleted while their
  conversation was copied) are retried with backoff and a smaller batch.
- One lifecycle run per database at a time (see ``_Guard``), and an audit row in
  ``chatdb_runs`` for every run, updated in the same transaction as each batch so that
  its counts are exactly what was committed, even after SIGKILL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import os
import re
import socket
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Connection,
    Engine,
    Select,
    Table,
    TextClause,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.exc import DBAPIError

from chatdb import db, migrations, patterns
from chatdb.errors import StateError, UsageError, one_line
from chatdb.schema import (
    chatdb_runs,
    conversations,
    conversations_archive,
    messages,
    messages_archive,
    users,
)

DEFAULT_BATCH_SIZE = 1000
#: Batches in flight at once, each on a connection of its own.
DEFAULT_JOBS = 2
MAX_JOBS = 8
DEFAULT_DELETED_GRACE = "30d"

#: A batch aims at this duration; its size in conversations adapts to it.
SLOW_TRANSACTION_SECONDS = 0.25  # reported: transactions longer than this
TARGET_BATCH_SECONDS = 0.05
FIRST_BATCH_SIZE = 50
FIRST_WINDOW_BLOCKS = 4
MAX_WINDOW_BLOCKS = 1 << 20
LOCK_TIMEOUT = "500ms"
_TAIL_BYTES = 64  # the export's last bytes, hashed in the audit row, identify the file
SETTLE_TIMEOUT = "2s"  # waiting to learn whether an interrupted COMMIT committed
STATEMENT_TIMEOUT = "60s"
#: Attempts of one batch before a persistent lock conflict ends the run.
MAX_ATTEMPTS = 6
#: Sweeps that find every remaining row locked by another session before the run gives up.
MAX_LOCKED_SWEEPS = 8
#: A run that has not renewed its heartbeat for this long is reported as stalled.
STALLED_SECONDS = 60
#: How long a run waits for the server to end the session of a holder that died on this
#: machine a moment ago.
DEAD_HOLDER_WAIT = 5.0

#: Retried: lock_not_available, deadlock_detected, serialization_failure, query_canceled
#: (statement_timeout; retried with a smaller batch), foreign_key_violation (a user
#: deleted while we copied their conversation).
_RETRYABLE = {"55P03", "40P01", "40001", "57014", "23503"}

#: The advisory lock that makes a run the only one: "chat", "life".
_GUARD_KEY = (0x63686174, 0x6C696665)


# --- durations -----------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
# ASCII digits only: \d and int() also take the digits of other scripts (Arabic-Indic,
# fullwidth), which a duration never has.
_DURATION = re.compile(r"(?:[0-9]+[a-z]+)+")
_PART = re.compile(r"([0-9]+)([a-z]+)")
MAX_DURATION_SECONDS = 36_525 * 86_400  # 100 years


@dataclass(frozen=True)
class Duration:
    text: str
    seconds: int

    def __str__(self) -> str:
        return self.text


def parse_duration(raw: str, option: str = "duration") -> Duration:
    """``90d``, ``12h``, ``1d12h``, ``2w``: whole numbers with a unit (s, m, h, d, w).
    Units are exact: a day is 86,400 seconds."""
    value = raw.strip().lower()
    expected = "expected a whole number and a unit (s, m, h, d, w), such as 90d or 1d12h"
    if not _DURATION.fullmatch(value):
        raise UsageError(f"invalid {option} {raw!r}: {expected}")
    seconds = 0
    seen: set[str] = set()
    for number, unit in _PART.findall(value):
        if unit not in _UNITS:
            raise UsageError(f"invalid {option} {raw!r}: unknown unit {unit!r}; {expected}")
        if unit in seen:
            raise UsageError(f"invalid {option} {raw!r}: the unit {unit!r} appears twice")
        seen.add(unit)
        seconds += int(number) * _UNITS[unit]
    if seconds <= 0:
        raise UsageError(f"invalid {option} {raw!r}: it must be longer than zero")
    if seconds > MAX_DURATION_SECONDS:
        raise UsageError(f"invalid {option} {raw!r}: more than 100 years")
    return Duration(value, seconds)


# --- results -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Rows moved or deleted: in the hot tables, and in the archive tables."""

    conversations: int = 0
    messages: int = 0
    archive_conversations: int = 0
    archive_messages: int = 0

    def add(self, other: Tally) -> None:
        self.conversations += other.conversations
        self.messages += other.messages
        self.archive_conversations += other.archive_conversations
        self.archive_messages += other.archive_messages

    def as_dict(self) -> dict[str, int]:
        return {
            "conversations": self.conversations,
            "messages": self.messages,
            "archive_conversations": self.archive_conversations,
            "archive_messages": self.archive_messages,
        }

    @property
    def rows(self) -> int:
        return self.conversations + self.messages + self.archive_conversations + self.archive_messages


@dataclass(frozen=True)
class Plan:
    """What a run will do: its cutoffs, taken from the database clock, and (when counted)
    exactly how many rows match them now."""

    command: str
    cutoff: dt.datetime | None = None
    deleted_cutoff: dt.datetime | None = None
    counts: Tally | None = None
    # archive restore: the conversations to bring back, and those of them already hot
    conversation_ids: tuple[uuid.UUID, ...] = ()
    user_id: str | None = None
    already_hot: tuple[uuid.UUID, ...] = ()


@dataclass
class Vacuum:
    """The dead rows a run left (the rows it deleted from each table, where they are enough
    for the table to need VACUUM, by doctor's rule), and what ``--vacuum`` did about them."""

    needed: dict[str, int] = field(default_factory=dict)
    vacuumed: list[str] = field(default_factory=list)
    stopped_by: str | None = None  # a signal stopped the VACUUM: "interrupted", "terminated"

    def left(self) -> dict[str, int]:
        """The tables that still need VACUUM, with the dead rows the run left in each."""
        return {table: rows for table, rows in self.needed.items() if table not in self.vacuumed}

    def fix(self) -> str:
        return " ".join(f"VACUUM (ANALYZE) {table};" for table in self.left())


@dataclass
class RunResult:
    command: str
    run_id: int | None
    plan: Plan
    done: Tally = field(default_factory=Tally)
    complete: bool = True
    stopped_by: str | None = None  # "interrupted", "terminated" or "max-runtime"
    remaining: Tally | None = None
    batches: int = 0
    longest_transaction_seconds: float = 0.0
    slow_transactions: int = 0  # longer than SLOW_TRANSACTION_SECONDS
    jobs: int = 1
    retries: int = 0  # batches rolled back and tried again (lock timeouts, deadlocks)
    elapsed_seconds: float = 0.0
    exported: int = 0
    took_over: list[int] = field(default_factory=list)  # earlier runs found dead
    vacuum: Vacuum = field(default_factory=Vacuum)

    @property
    def outcome(self) -> str:
        return "interrupted" if self.stopped_by in ("interrupted", "terminated") else "succeeded"


@dataclass
class RunOptions:
    """How a run proceeds. ``should_stop`` returns a reason ("interrupted", "terminated")
    once the user asked to stop; the run ends after the batch in flight."""

    batch_size: int = DEFAULT_BATCH_SIZE
    jobs: int = DEFAULT_JOBS
    max_runtime: Duration | None = None
    should_stop: Callable[[], str | None] = lambda: None
    progress: Callable[[Tally], None] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    #: Called once the run's outcome is committed to its audit row: the run is over.
    recorded: Callable[[], None] = lambda: None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if not 1 <= self.jobs <= MAX_JOBS:
            raise UsageError(f"--jobs must be between 1 and {MAX_JOBS}")


# --- plans ---------------------------------------------------------------------------------


def _ids_param(ids: Sequence[uuid.UUID]):
    return literal(list(ids), ARRAY(UUID(as_uuid=True)))


def _cutoff(connection: Connection, duration: Duration) -> dt.datetime:
    return connection.execute(
        select(func.now() - func.make_interval(0, 0, 0, 0, 0, 0, literal(duration.seconds)))
    ).scalar_one()


def _count(connection: Connection, query: Select) -> int:
    return int(connection.execute(select(func.count()).select_from(query.subquery())).scalar_one())


def _archivable(cutoff: Any):
    c = conversations.c
    return (c.updated_at < cutoff) & c.deleted_at.is_(None)


def _purgeable(table: Table, cutoff: Any, deleted_cutoff: Any):
    c = table.c
    return or_(c.updated_at < cutoff, c.deleted_at < deleted_cutoff)


def _archive_counts(connection: Connection, cutoff: Any) -> Tally:
    chosen = select(conversations.c.id).where(_archivable(cutoff))
    return Tally(
        conversations=_count(connection, chosen),
        messages=_count(connection, select(messages.c.id).where(messages.c.conversation_id.in_(chosen))),
    )


def _purge_counts(connection: Connection, cutoff: Any, deleted_cutoff: Any) -> Tally:
    found = []
    for parent, child in ((conversations, messages), (conversations_archive, messages_archive)):
        gone = _purgeable(parent, cutoff, deleted_cutoff)
        found.append(_count(connection, select(parent.c.id).where(gone)))
        # A message goes with its conversation, or on its own once soft-deleted. Counted
        # through a join (every message has its conversation): `IN (subquery)` under an OR
        # cannot become a semi-join, and is a SubPlan that turns quadratic once the ids no
        # longer fit in work_mem.
        owned = child.join(parent, child.c.conversation_id == parent.c.id)
        found.append(
            _count(
                connection,
                select(child.c.id).select_from(owned).where(or_(gone, child.c.deleted_at < deleted_cutoff)),
            )
        )
    return Tally(*found)


def plan_archive(engine: Engine, older_than: Duration, *, count: bool = True) -> Plan:
    """The cutoff of an archive run and, with ``count``, what it would move now."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        cutoff = _cutoff(connection, older_than)
        counts = _archive_counts(connection, cutoff) if count else None
    return Plan("archive", cutoff=cutoff, counts=counts)


def plan_purge(engine: Engine, older_than: Duration, deleted_grace: Duration, *, count: bool = True) -> Plan:
    """The cutoffs of a purge run and, with ``count``, what it would delete now."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        cutoff = _cutoff(connection, older_than)
        deleted_cutoff = _cutoff(connection, deleted_grace)
        counts = _purge_counts(connection, cutoff, deleted_cutoff) if count else None
    return Plan("purge", cutoff=cutoff, deleted_cutoff=deleted_cutoff, counts=counts)


def plan_restore(
    engine: Engine, conversation_ids: Sequence[uuid.UUID] = (), user_id: str | None = None
) -> Plan:
    """What ``archive restore`` would bring back. A named conversation already in the hot
    tables (restored by an earlier run that stopped, say) needs nothing; if any named
    conversation is in neither, nothing is restored."""
    if bool(conversation_ids) == (user_id is not None):
        raise UsageError("give either --conversation (one or more) or --user")
    migrations.require_head(engine)
    ids = tuple(dict.fromkeys(conversation_ids))
    hot: tuple[uuid.UUID, ...] = ()
    with engine.connect() as connection:
        if (
            user_id is not None
            and not connection.execute(select(exists().where(users.c.id == user_id))).scalar_one()
        ):
            raise StateError(f"no user {user_id!r} in the users table; nothing was restored")
        chosen = _restorable(ids, user_id)
        found = set(connection.execute(chosen).scalars())
        if ids and len(found) < len(ids):
            in_hot = set(
                connection.execute(
                    select(conversations.c.id).where(conversations.c.id == any_(_ids_param(ids)))
                ).scalars()
            )
            missing = [str(i) for i in ids if i not in found and i not in in_hot]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                are = "is" if len(missing) == 1 else "are"
                raise StateError(
                    f"{len(missing)} of the given conversations {are} in neither the archive nor the "
                    f"hot tables: {', '.join(missing[:5])}{more}",
                    hint="nothing was restored",
                )
            hot = tuple(i for i in ids if i not in found)
        counts = Tally(
            archive_conversations=len(found),
            archive_messages=_count(
                connection,
                select(messages_archive.c.id).where(messages_archive.c.conversation_id.in_(chosen)),
            ),
        )
    return Plan("archive restore", counts=counts, conversation_ids=ids, user_id=user_id, already_hot=hot)


def _restorable(ids: Sequence[uuid.UUID], user_id: str | None) -> Select:
    c = conversations_archive.c
    if ids:
        return select(c.id).where(c.id == any_(_ids_param(ids)))
    return select(c.id).where(c.user_id == user_id)


# --- the guard -----------------------------------------------------------------------------


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


class _Guard:
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
        while not self._try_lock():
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

    def _try_lock(self) -> bool:
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
    return {"a": _GUARD_KEY[0], "b": _GUARD_KEY[1]}


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


# --- the export file -----------------------------------------------------------------------


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def check_export(path: Path) -> None:
    """Refuse an ``--export`` target that is not named FILE.jsonl or FILE.jsonl.gz, or that
    exists and is not a regular file (a symbolic link to one is fine): a FIFO would block
    the run, and a device cannot be cut back to what the database committed."""
    name = path.name.lower()
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise UsageError(f"--export {path}: the file name must end in .jsonl or .jsonl.gz")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return  # a new file
    except OSError as exc:
        raise UsageError(f"cannot write --export {path}: {exc.strerror}") from None
    _check_regular(path, mode)


def _check_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UsageError(f"--export {path} is {kind}: give a regular file or a new path")


class _Export:
    """Moved conversations as JSON lines, one per conversation with its messages, in
    ``.jsonl`` or ``.jsonl.gz``, in a regular file. Each batch is appended (a gzip member
    of its own) and fsynced before the batch commits, and the batch's transaction records
    in the run's audit row how long the file is with it and a hash of its last bytes.
    Before the lines reach the file, the run records durably, in a transaction of its
    own, what it is about to append (``intent``): so the database always knows the
    file's committed length and what may follow it. A run that does not learn whether a
    batch committed (interrupted during its COMMIT) waits for the database to tell; when
    it cannot (SIGKILL, a crash of the server or of chatdb, a lost connection), the next
    run exporting to the same file cuts it back to the length the database committed,
    before it appends anything, if what follows is provably that batch (see ``repair``)."""

    def __init__(self, path: Path) -> None:
        check_export(path)
        self.path = path
        self.compressed = path.name.lower().endswith(".gz")
        try:
            # Opening changes nothing in the file: it is cut back only under the guard.
            # Non-blocking: a FIFO put in its place meanwhile fails or is refused below,
            # never waits for a reader. Unbuffered: a failed write leaves nothing behind
            # to be written later.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot write --export {path}: {exc.strerror}") from None
        try:
            _check_regular(path, os.fstat(fd).st_mode)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        self.file = open(fd, "ab", buffering=0)  # noqa: SIM115 - open for the whole run
        self.identity = {"export_path": str(path.resolve())}
        self.end = 0  # the file's length with every batch known to have committed (see repair)
        self.tail = b""  # its last bytes, which identify it
        self.pending = b""  # the batch being written, after ``end``

    def repair(self, committed: int | None, tail: str | None, intent: dict[str, Any] | None) -> None:
        """Cut off what no committed batch wrote. ``committed`` and ``tail`` are the length
        of this file and the hash of its last bytes that the last run exporting to this
        path recorded (None: no run did), ``intent`` what that run recorded it was about
        to append after them (None: nothing). Runs under the guard: no other run appends
        meanwhile."""
        size = os.fstat(self.file.fileno()).st_size
        length = None
        # The file as that run left it committed (its bytes up to there end as recorded,
        # an empty start included), followed by nothing, or by the batch it was about to
        # append, whole or cut short, and nothing else: provably bytes of a batch that
        # never committed, which go. Anything else is not the file that run wrote.
        if committed is not None and committed <= size and self._hash(self._read_tail(committed)) == tail:
            written = self._written(committed, size, intent)
            if committed + written == size:
                length = committed
            elif written:
                raise StateError(
                    f"--export {self.path}: bytes {committed:,} to {committed + written:,} are the lines"
                    " of a batch that never committed, and more follows them; chatdb cuts a file back"
                    " only at its end",
                    hint="remove those bytes from the file, or export to a new file",
                )
        if length is None:
            # Not a file the database knows an unfinished run of: keep every complete line,
            # cut off only an incomplete tail.
            length = self._complete_length(size)
        if length < size:
            self.file.truncate(length)
            os.fsync(self.file.fileno())
        self.end = length
        self.tail = self._read_tail(length)

    def _read_tail(self, length: int) -> bytes:
        with open(self.path, "rb") as existing:
            existing.seek(max(0, length - _TAIL_BYTES))
            return existing.read(length - max(0, length - _TAIL_BYTES))

    def _written(self, offset: int, size: int, intent: dict[str, Any] | None) -> int:
        """How many bytes after ``offset`` are provably (the start of) the batch that
        ``intent`` describes: all of it, or its first bytes and what followed of it before
        a write was cut short. 0 when they are not."""
        if not intent or intent.get("at") != offset:
            return 0
        total = int(intent["bytes"])
        length = min(size - offset, total)
        head = min(_TAIL_BYTES, total)
        if length < head:
            return 0  # too short to tell: an incomplete line, which goes anyway
        with open(self.path, "rb") as existing:
            existing.seek(offset)
            start = existing.read(head)
            if self._hash(start) != intent["head"]:
                return 0
            if length < total:
                return length  # a write cut short
            digest = hashlib.sha256(start)
            while chunk := existing.read(min(1 << 20, offset + total - existing.tell())):
                digest.update(chunk)
        return length if digest.hexdigest() == intent["hash"] else 0

    @staticmethod
    def _hash(tail: bytes) -> str:
        return hashlib.sha256(tail).hexdigest()

    def recorded(self, data: bytes) -> dict[str, Any]:
        """What the audit row records of the file once ``data`` is appended."""
        tail = (self.tail + data)[-_TAIL_BYTES:]
        return {"export_bytes": self.end + len(data), "export_tail": self._hash(tail)}

    def intent(self, data: bytes) -> dict[str, Any]:
        """What the audit row records, before ``data`` reaches the file, of what is about
        to follow the committed length: where it starts, its length, and hashes of its
        first bytes and of all of it."""
        return {
            "at": self.end,
            "bytes": len(data),
            "head": self._hash(data[:_TAIL_BYTES]),
            "hash": self._hash(data),
        }

    def _complete_length(self, size: int) -> int:
        with open(self.path, "rb") as existing:
            if not self.compressed:
                # The end of the last complete line, read backwards from the end.
                position = size
                while position > 0:
                    start = max(0, position - (1 << 20))
                    existing.seek(start)
                    newline = existing.read(position - start).rfind(b"\n")
                    if newline >= 0:
                        return start + newline + 1
                    position = start
                return 0
            good = position = 0
            decompressor = zlib.decompressobj(31)
            pending = b""
            while True:
                chunk = pending or existing.read(1 << 20)
                pending = b""
                if not chunk:
                    return good  # an incomplete last member (or none) is cut off
                try:
                    decompressor.decompress(chunk)
                except zlib.error:
                    raise StateError(
                        f"--export {self.path}: the gzip data after byte {good:,} is damaged;"
                        " chatdb appends only to an intact file",
                        hint="export to a new file",
                    ) from None
                position += len(chunk) - len(decompressor.unused_data)
                if decompressor.eof:
                    good = position
                    pending = decompressor.unused_data
                    decompressor = zlib.decompressobj(31)

    def encode(self, lines: list[str]) -> bytes:
        data = "".join(line + "\n" for line in lines).encode()
        return gzip.compress(data, compresslevel=6, mtime=0) if self.compressed else data

    def write(self, data: bytes) -> None:
        """Append a batch's lines, after ``end``, durably."""
        self.pending = data
        view = memoryview(data)
        try:
            while view:
                view = view[self.file.write(view) :]
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise StateError(
                f"cannot write --export {self.path}: {exc.strerror}",
                hint="the batch in flight rolled back; run the command again once the file can be written",
            ) from None

    def committed(self) -> None:
        """The batch just written committed."""
        self.end += len(self.pending)
        self.tail = (self.tail + self.pending)[-_TAIL_BYTES:]
        self.pending = b""

    def undo(self) -> bool:
        """The batch being written did not commit: cut off whatever of it reached the file.
        False when the file cannot be cut (the error that stopped the batch is the one to
        report): the lines stay after the committed length, and the next run exporting
        to this file cuts them off, as the run recorded them (see ``intent``)."""
        try:
            self.file.truncate(self.end)
            os.fsync(self.file.fileno())
        except OSError:
            return False
        self.pending = b""
        return True

    def settle(self, committed: int | None) -> None:
        """The database says the file is ``committed`` bytes long with the batches that
        committed: keep the batch being written, or cut it off."""
        if committed == self.end + len(self.pending):
            self.committed()
        elif committed == self.end:
            self.undo()

    def close(self) -> None:
        self.file.close()


def _export_lines(connection: Connection, ids: Sequence[uuid.UUID]) -> list[str]:
    """One JSON object per conversation, as it was in the hot tables (without
    ``archived_at``, so that a batch written twice gives identical lines)."""
    return list(
        connection.execute(
            text(
                "SELECT jsonb_build_object("
                " 'conversation', to_jsonb(c) - 'archived_at',"
                " 'messages', coalesce((SELECT jsonb_agg(to_jsonb(m) - 'archived_at'"
                "   ORDER BY m.created_at, m.id) FROM messages_archive m WHERE m.conversation_id = c.id),"
                "   '[]'::jsonb))::text"
                " FROM conversations_archive c WHERE c.id = ANY(:ids) ORDER BY c.updated_at, c.id"
            ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))),
            {"ids": list(ids)},
        ).scalars()
    )


# --- moving and deleting -------------------------------------------------------------------


def _move(source: Table, target: Table, key: str, columns: Table) -> TextClause:
    """Delete rows from ``source`` and insert them, as deleted, into ``target``, in one
    statement: a row changed concurrently is moved in its newest version, never an older
    copy of it. Identifiers come from chatdb.schema."""
    names = ", ".join(f'"{column.name}"' for column in columns.c)
    return text(
        f'WITH moved AS (DELETE FROM "{source.name}" WHERE "{key}" = ANY(:ids) RETURNING {names})'
        f' INSERT INTO "{target.name}" ({names}) SELECT {names} FROM moved'
    ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))


def _copy(source: Table, target: Table) -> TextClause:
    names = ", ".join(f'"{column.name}"' for column in conversations.c)
    return text(
        f'INSERT INTO "{target.name}" ({names}) SELECT {names} FROM "{source.name}" WHERE id = ANY(:ids)'
    ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))


_ARCHIVE_CONVERSATIONS = _copy(conversations, conversations_archive)
_ARCHIVE_MESSAGES = _move(messages, messages_archive, "conversation_id", messages)
_RESTORE_CONVERSATIONS = _copy(conversations_archive, conversations)
_RESTORE_MESSAGES = _move(messages_archive, messages, "conversation_id", messages)


def _archive_batch(connection: Connection, ids: list[uuid.UUID]) -> Tally:
    params = {"ids": ids}
    connection.execute(_ARCHIVE_CONVERSATIONS, params)
    moved_messages = connection.execute(_ARCHIVE_MESSAGES, params).rowcount
    # No message remains to cascade to: adding one needs a lock on its conversation,
    # which this transaction holds.
    moved = connection.execute(
        delete(conversations).where(conversations.c.id == any_(_ids_param(ids)))
    ).rowcount
    return Tally(conversations=moved, messages=moved_messages)


def _restore_batch(connection: Connection, ids: list[uuid.UUID]) -> Tally:
    params = {"ids": ids}
    connection.execute(_RESTORE_CONVERSATIONS, params)
    restored_messages = connection.execute(_RESTORE_MESSAGES, params).rowcount
    restored = connection.execute(
        delete(conversations_archive).where(conversations_archive.c.id == any_(_ids_param(ids)))
    ).rowcount
    return Tally(archive_conversations=restored, archive_messages=restored_messages)


def _deleted(hot: bool, conversations: int, messages: int) -> Tally:
    """The counts of a batch that deleted conversations (and their messages) from the hot
    tables or from the archive."""
    if hot:
        return Tally(conversations=conversations, messages=messages)
    return Tally(archive_conversations=conversations, archive_messages=messages)


_XACT_DELETED = text(
    "SELECT pg_stat_get_xact_tuples_deleted(CAST(:table AS regclass)), current_setting('track_counts')::bool"
)


def _delete_conversations(parent: Table, child: Table, hot: bool) -> Callable[[Connection, list], Tally]:
    def apply(connection: Connection, ids: list[uuid.UUID]) -> Tally:
        before, counted = connection.execute(_XACT_DELETED, {"table": child.name}).one()
        if counted:
            # The foreign key's cascade deletes the messages, one index probe per
            # conversation; this transaction's own statistics count them exactly.
            n_conversations = connection.execute(
                delete(parent).where(parent.c.id == any_(_ids_param(ids)))
            ).rowcount
            n_messages = connection.execute(_XACT_DELETED, {"table": child.name}).scalar_one() - before
        else:
            n_messages = connection.execute(
                delete(child).where(child.c.conversation_id == any_(_ids_param(ids)))
            ).rowcount
            n_conversations = connection.execute(
                delete(parent).where(parent.c.id == any_(_ids_param(ids)))
            ).rowcount
        return _deleted(hot, n_conversations, n_messages)

    return apply


def _delete_messages(table: Table, hot: bool) -> Callable[[Connection, list], Tally]:
    def apply(connection: Connection, ids: list[uuid.UUID]) -> Tally:
        n = connection.execute(delete(table).where(table.c.id == any_(_ids_param(ids)))).rowcount
        return Tally(messages=n) if hot else Tally(archive_messages=n)

    return apply


@dataclass
class _Taken:
    """What one batch did: the rows it picked (and locked), the position after them (see
    _Phase), its counts, and the ids of the conversations it took (for the export)."""

    picked: int = 0
    last: Any = None
    tally: Tally = field(default_factory=Tally)
    ids: list[uuid.UUID] = field(default_factory=list)


@dataclass(frozen=True)
class _Phase:
    """One kind of work: which rows, in which order, and what to do with a batch of them.

    ``take(connection, limit, after)`` locks up to ``limit`` matching rows FOR UPDATE
    SKIP LOCKED and deals with them, in the batch's transaction. Keyset phases go in
    index order: ``after`` is the position (key, id) of the last row taken, shared by
    the run's workers. With ``blocks`` set, the phase goes through that table in
    physical order (see _in_blocks): ``after`` is a window (ctid, end block) that one
    worker claimed. ``pending`` is true while any row still matches (locked or not).
    ``fills`` marks a phase that inserts into tables it makes grow, perhaps from empty
    (see _Runner._replan)."""

    name: str
    take: Callable[[Connection, int, Any], _Taken]
    pending: Select
    export: bool = False
    fills: bool = False
    blocks: Table | None = None


def _resized(current: int, done: int, elapsed: float, cap: int) -> int:
    """The next size (rows or blocks) of a batch whose ``done`` took ``elapsed`` seconds,
    aiming at TARGET_BATCH_SECONDS: at most half as large or half as large again as
    ``current``, and never above ``cap``. A conversation too large for the aim is still
    handled alone, in one transaction."""
    wanted = done * TARGET_BATCH_SECONDS / max(elapsed, 1e-4)
    return max(1, round(min(max(wanted, current / 2, 1), current * 1.5 + 1, cap)))


def _locked(query: Select) -> Select:
    return query.with_for_update(skip_locked=True)


def _keyset(
    pick: Callable[[int, tuple | None], Select], apply: Callable[[Connection, list[uuid.UUID]], Tally]
) -> Callable[[Connection, int, Any], _Taken]:
    """A keyset phase: ``pick(limit, after)`` selects ``(id, key)`` of the rows after
    ``after`` = (key, id), in (key, id) order; ``apply`` deals with their ids."""

    def take(connection: Connection, limit: int, after: tuple | None) -> _Taken:
        rows = connection.execute(_locked(pick(limit, after))).all()
        if not rows:
            return _Taken()
        ids = [row[0] for row in rows]
        return _Taken(len(rows), (rows[-1][1], rows[-1][0]), apply(connection, ids), ids)

    return take


# Batches in physical order. Idle conversations are taken in the order their pages, and
# mostly their messages' pages, lie on disk, one window of heap blocks at a time (a TID
# range scan): a run reads and writes each page once, in sequence, where the order of
# updated_at jumps about the tables (a quarter slower on the seeded database). A full
# batch leaves the rest of its window to the next, which starts after the largest ctid it
# took. The scan returns rows in ctid order, so a LIMIT stops it early; no ORDER BY (a
# sort would read the whole rest of the window for every batch). Nothing relies on that
# order for correctness: a row the position passed over, like one that moved while the
# run went (an update writes its new version elsewhere), still matches, and the sweep
# from the start that follows a pass leaving matching rows behind takes it. Under the
# lock, a row updated concurrently comes back as its new version; only rows inside the
# window move its position on.

_WINDOW = "ctid > CAST(:after AS tid) AND ctid < CAST(:end AS tid)"


def _tid(raw: str) -> tuple[int, int]:
    block, offset = raw.strip("()").split(",")
    return int(block), int(offset)


def _in_blocks(
    table: Table, condition: Any, apply: Callable[[Connection, list[uuid.UUID]], Tally]
) -> Callable[[Connection, int, Any], _Taken]:
    """A phase in physical order whose ``apply`` deals with the ids of the rows of
    ``table`` matching ``condition``."""

    def take(connection: Connection, limit: int, window: tuple[str, int]) -> _Taken:
        after, end = window
        query = select(table.c.id, literal_column("CAST(ctid AS text)")).where(
            condition, text(_WINDOW).bindparams(after=after, end=f"({end},0)")
        )
        rows = connection.execute(_locked(query.limit(limit))).all()
        if not rows:
            return _Taken()
        ids = [row[0] for row in rows]
        lower, upper = _tid(after), (end, 0)
        inside = [tid for tid in (_tid(row[1]) for row in rows) if lower < tid < upper]
        last = "({},{})".format(*max(inside)) if inside else None
        return _Taken(len(rows), last, apply(connection, ids), ids)

    return take


def _counts_tracked(connection: Connection) -> bool:
    """Whether this session counts the rows it changes (track_counts), asked once per
    connection."""
    if "track_counts" not in connection.info:
        connection.info["track_counts"] = connection.execute(
            text("SELECT current_setting('track_counts')::bool")
        ).scalar_one()
    return connection.info["track_counts"]


def _purge_in_blocks(parent: Table, child: Table, hot: bool, cutoff: Any) -> Callable[..., _Taken]:
    """Idle conversations of ``parent`` deleted in physical order, picked and deleted by
    one statement. The foreign key's cascade deletes their messages, one index probe per
    conversation, and this transaction's own statistics count them exactly: the
    statement reads the count before the cascade (which runs once it has finished), a
    query after it the count after.

    The delete goes by id and checks the cutoff again: a conversation updated (still
    idle) after the statement began is locked in its new version, which the statement's
    snapshot does not see; by id, the delete follows the update to the version locked.

    A session without statistics (track_counts off) takes the longer way: it locks the
    conversations, then deletes and counts their messages in a statement of its own,
    whose snapshot sees every message committed before the lock (one statement's
    snapshot could miss one, which the cascade would then delete uncounted)."""
    cascaded = "pg_stat_get_xact_tuples_deleted(CAST(:table AS regclass))"
    statement = text(
        f'WITH picked AS (SELECT id, ctid FROM "{parent.name}" WHERE updated_at < :cutoff AND {_WINDOW}'
        " LIMIT :limit FOR UPDATE SKIP LOCKED),"
        f' gone AS (DELETE FROM "{parent.name}" WHERE id = ANY(ARRAY(SELECT id FROM picked))'
        " AND updated_at < :cutoff RETURNING id)"
        f" SELECT {cascaded}, (SELECT count(*) FROM picked), (SELECT count(*) FROM gone),"
        f" CAST((SELECT max(ctid) FROM picked WHERE {_WINDOW}) AS text)"
    )
    uncounted = _in_blocks(parent, parent.c.updated_at < cutoff, _delete_conversations(parent, child, hot))

    def take(connection: Connection, limit: int, window: tuple[str, int]) -> _Taken:
        if not _counts_tracked(connection):
            return uncounted(connection, limit, window)
        after, end = window
        params = {"cutoff": cutoff, "after": after, "end": f"({end},0)", "limit": limit, "table": child.name}
        # The session's counts not yet reported include earlier transactions': the
        # cascade's are the difference.
        before, picked, n_conversations, last = connection.execute(statement, params).one()
        if not picked:
            return _Taken()
        n_messages = connection.execute(_XACT_DELETED, {"table": child.name}).one()[0] - before
        return _Taken(picked, last, _deleted(hot, n_conversations, n_messages))

    return take


def _archive_phases(plan: Plan) -> list[_Phase]:
    return [
        _Phase(
            "archive idle conversations",
            _in_blocks(conversations, _archivable(plan.cutoff), _archive_batch),
            select(exists().where(_archivable(plan.cutoff))),
            export=True,
            fills=True,
            blocks=conversations,
        )
    ]


def _purge_phases(plan: Plan) -> list[_Phase]:
    grace = plan.deleted_cutoff
    phases = []
    for parent, child, hot in (
        (conversations, messages, True),
        (conversations_archive, messages_archive, False),
    ):
        where = "" if hot else " (archive)"
        phases += [
            _Phase(
                f"idle conversations{where}",
                _purge_in_blocks(parent, child, hot, plan.cutoff),
                select(exists().where(parent.c.updated_at < plan.cutoff)),
                blocks=parent,
            ),
            _Phase(
                f"soft-deleted conversations{where}",
                _keyset(
                    lambda limit, after, t=parent: patterns.soft_deleted(
                        t, plan.deleted_cutoff, limit, after
                    ),
                    _delete_conversations(parent, child, hot),
                ),
                select(exists().where(parent.c.deleted_at < grace)),
            ),
            _Phase(
                f"soft-deleted messages{where}",
                _keyset(
                    lambda limit, after, t=child: patterns.soft_deleted(t, grace, limit, after),
                    _delete_messages(child, hot),
                ),
                select(exists().where(child.c.deleted_at < grace)),
            ),
        ]
    return phases


def _restore_phases(plan: Plan) -> list[_Phase]:
    c = conversations_archive.c
    chosen = _restorable(plan.conversation_ids, plan.user_id)

    def pick(limit: int, after: tuple | None) -> Select:
        query = chosen.add_columns(c.id)  # (id, key): the key is the id itself
        if after is not None:
            query = query.where(c.id > after[1])
        return query.order_by(c.id).limit(limit)

    return [
        _Phase(
            "restore archived conversations",
            _keyset(pick, _restore_batch),
            select(exists(chosen)),
            fills=True,
        )
    ]


# --- running -------------------------------------------------------------------------------


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


class _Runner:
    """Runs the phases of one command with ``jobs`` workers, each on a connection of its
    own. The workers of a pass share one keyset position: each locks the next batch after
    it, and SKIP LOCKED passes over the batches the others hold."""

    def __init__(self, engine: Engine, plan: Plan, options: RunOptions, export: _Export | None) -> None:
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

    def run(self, phases: list[_Phase]) -> RunResult:
        guard = _Guard(self.engine)
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

    def _drain(self, phase: _Phase) -> bool:
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

    def _pass(self, phase: _Phase) -> int:
        state = _Pass()
        if phase.blocks is not None:
            # Blocks added later hold rows written since: a sweep after this pass finds
            # any that match.
            assert self.connection is not None
            with self.connection.begin():
                state.end_block = self.connection.execute(
                    text(
                        "SELECT pg_relation_size(CAST(:table AS regclass))"
                        " / current_setting('block_size')::int"
                    ),
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
                    worker.connection.connection.dbapi_connection.cancel()
            # The run closes once no worker uses its connections any more: the cancelled
            # batches end at once. (A third signal cuts this short: the process exits,
            # and a batch not yet committing rolls back with its connection.)
            for done in started:
                done.wait()
            raise
        if state.failure is not None:
            raise state.failure
        return state.rows

    def _work(self, worker: _Worker, phase: _Phase, state: _Pass) -> None:
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

    def _pending(self, phase: _Phase) -> bool:
        assert self.connection is not None
        with self.connection.begin():
            return bool(self.connection.execute(phase.pending).scalar())

    def _batch(self, worker: _Worker, phase: _Phase, after: Any) -> _Taken:
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
                        text(
                            "SELECT set_config('lock_timeout', :lock, true),"
                            " set_config('statement_timeout', :statement, true),"
                            # A batch lost by a server crash is simply done again; but
                            # an export's lines stay in the file, so a batch that
                            # exports is committed for good before chatdb hears so.
                            " set_config('synchronous_commit', :commit, true),"
                            " set_config('TimeZone', 'UTC', true)"
                        ),
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
                        data = self.export.encode(_export_lines(connection, taken.ids))
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
            worker.size = _resized(worker.size, taken.picked, elapsed, self.options.batch_size)
        return taken

    @staticmethod
    def _advance(worker: _Worker, window: tuple[str, int], taken: _Taken, full: bool, elapsed: float) -> None:
        """After a batch in the worker's window: a full batch leaves the rest of the
        window for the next one; otherwise the window is done, and the next one is
        sized by how long this one took."""
        after, end = window
        if full and taken.last is not None:
            worker.window = (taken.last, end)
            return
        worker.window = None
        if not full:
            covered = end - _tid(after)[0]
            worker.blocks = _resized(worker.blocks, covered, elapsed, MAX_WINDOW_BLOCKS)

    @staticmethod
    def _replan(worker: _Worker, phase: _Phase) -> None:
        """Discard the session's cached plans each time the rows this worker has moved
        have doubled. The foreign-key check of every inserted row runs a plan cached in
        the session; one made while the target table was nearly empty scans that table
        whole, and goes on doing so as it grows, until autovacuum happens to analyse it
        (a first archive into empty archive tables ran four times slower)."""
        if phase.fills and worker.rows > 2 * worker.planned_at:
            worker.connection.execute(text("DISCARD PLANS"))
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
        append when it recorded them last (see _Export.intent), if any."""
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
            self.result.remaining = _remaining(self.engine, self.plan)
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


def _remaining(engine: Engine, plan: Plan) -> Tally | None:
    """What still matches the run's cutoffs, when it stopped early."""
    if plan.command not in ("archive", "purge"):
        return None
    with engine.connect() as connection:
        if plan.command == "archive":
            return _archive_counts(connection, plan.cutoff)
        return _purge_counts(connection, plan.cutoff, plan.deleted_cutoff)


def _masked(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key: db.mask_text(value) if isinstance(value, str) else value for key, value in arguments.items()}


# --- VACUUM after a run ---------------------------------------------------------------------


def _changed(result: RunResult) -> dict[str, tuple[int, int]]:
    """The tables a run changed: {table: (rows deleted from it, rows inserted into it)}."""
    done = result.done
    if result.command == "archive":
        changed = {
            conversations.name: (done.conversations, 0),
            messages.name: (done.messages, 0),
            conversations_archive.name: (0, done.conversations),
            messages_archive.name: (0, done.messages),
        }
    else:
        changed = {
            conversations.name: (done.conversations, 0),
            messages.name: (done.messages, 0),
            conversations_archive.name: (done.archive_conversations, 0),
            messages_archive.name: (done.archive_messages, 0),
        }
    return {table: rows for table, rows in changed.items() if any(rows)}


def _dead_left(engine: Engine, result: RunResult) -> dict[str, int]:
    """The tables whose rows the run deleted are enough for doctor's vacuum check to warn
    (its default thresholds), against the rows each held before (the planner's count)."""
    from chatdb.doctor.model import Thresholds
    from chatdb.doctor.tables import needs_vacuum

    deleted = {table: rows for table, (rows, _) in _changed(result).items() if rows}
    if not deleted:
        return {}
    limits = Thresholds()
    try:
        with engine.connect() as connection:
            before = dict(
                connection.execute(
                    text(
                        "SELECT c.relname, CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint"
                        " ELSE s.n_live_tup + s.n_dead_tup END"
                        " FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid"
                        " WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:names)"
                    ),
                    {"names": list(deleted)},
                ).all()
            )
    except DBAPIError:
        return {}  # a hint only: the run itself is over and recorded
    return {
        table: rows
        for table, rows in deleted.items()
        if needs_vacuum(rows, max(int(before.get(table) or 0) - rows, 0), limits.dead_ratio, limits.dead_rows)
    }


def vacuum(engine: Engine, result: RunResult) -> None:
    """``VACUUM (ANALYZE)`` the tables the run changed, one after the other, after its last
    batch and outside any transaction (VACUUM cannot run in one). It takes no lock that
    blocks reads or writes; never VACUUM FULL. ``result.vacuum.vacuumed`` lists the tables
    done, so a signal in the middle leaves it saying which."""
    # The run's own sessions, back in the pool, report the rows they deleted to the
    # statistics a moment after their last transaction (PostgreSQL 15 and later batch the
    # reports): made to report now, so that VACUUM's report comes after theirs, not before.
    sessions = [engine.connect() for _ in range(engine.pool.checkedin())]
    try:
        for session in sessions:
            if session.connection.dbapi_connection.info.server_version >= 150000:
                session.execute(text("SELECT pg_stat_force_next_flush()"))
                session.commit()
    finally:
        for session in sessions:
            session.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        quote = connection.dialect.identifier_preparer.quote
        for table in _changed(result):
            connection.execute(text(f"VACUUM (ANALYZE) {quote(table)}"))
            result.vacuum.vacuumed.append(table)


# --- the commands --------------------------------------------------------------------------


def archive(engine: Engine, plan: Plan, options: RunOptions, export: Path | None = None) -> RunResult:
    """Move every hot conversation idle since before ``plan.cutoff`` (and not soft-deleted),
    with all its messages, into the archive tables."""
    options.validate()
    writer = _Export(export) if export is not None else None
    try:
        result = _Runner(engine, plan, options, writer).run(_archive_phases(plan))
    finally:
        if writer is not None:
            writer.close()
    result.vacuum.needed = _dead_left(engine, result)
    return result


def purge(engine: Engine, plan: Plan, options: RunOptions) -> RunResult:
    """Delete, from the hot and the archive tables, conversations idle since before
    ``plan.cutoff`` and soft-deleted conversations and messages older than
    ``plan.deleted_cutoff``."""
    options.validate()
    result = _Runner(engine, plan, options, None).run(_purge_phases(plan))
    result.vacuum.needed = _dead_left(engine, result)
    return result


def restore(engine: Engine, plan: Plan, options: RunOptions) -> RunResult:
    """Move archived conversations back to the hot tables, exactly as they were."""
    options.validate()
    return _Runner(engine, plan, options, None).run(_restore_phases(plan))
