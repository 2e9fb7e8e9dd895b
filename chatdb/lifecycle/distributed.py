"""The lifecycle's phases on Citus, when chatdb's tables are distributed by ``user_id``:
every batch is one shard's work, sent as router queries.

Citus refuses a ``SELECT ... FOR UPDATE`` that spans shards, and the coordinator's tables
are empty shells, so the physical order (ctid windows) of one server finds nothing.
Here every phase goes in keyset order over ``(shard, user_id, id)``:

- A pass starts by finding, with a plain read over every shard and outside any batch,
  which users have matching rows, and by asking the coordinator which shard holds each
  (``get_shard_id_for_distribution_column``). The users are sorted by (shard, user_id).
- A batch takes the next users of one shard after the pass's position and locks their
  matching rows ``FOR UPDATE SKIP LOCKED`` with ``user_id = ANY(:users)``: all of those
  users hash to one shard, so Citus prunes the statement to that shard and sends it
  whole (a router query), WHERE clause and lock included. The worker's PostgreSQL
  re-checks the condition on the newest version of each row once it is locked, exactly
  as on one server.
- Everything the batch then does (copy, move, delete, the export's lines) names its rows
  by their whole key (id, user_id) and the same users, so it goes to the same shard; the
  audit row (``chatdb_runs``, on the coordinator) is updated in the same transaction, as
  on one server. ``chatdb_runs`` is a Citus local table (``chatdb migrate`` adds it to
  Citus's metadata): Citus updates it by its local execution, which makes it commit the
  transaction in two phases (PREPARE TRANSACTION on the worker, the commit decided by
  the coordinator's own), so a crash of the coordinator cannot keep the batch's rows
  without its counts.

The position after a batch is (shard's ordinal, user_id, id) of its last row; ``user_id``
is ordered by its bytes (``COLLATE "C"``), which is Python's order of ``str``. A user or
row found after the pass's start, or passed over, is taken by the sweep from the start
that follows a pass that leaves matching rows (the runner's ``pending``). See
docs/architecture.md, "Running on Citus".
"""

from __future__ import annotations

import bisect
import threading
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Select,
    Table,
    TextClause,
    any_,
    collate,
    exists,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import TEXT

from chatdb import citus
from chatdb.errors import StateError
from chatdb.lifecycle.models import Plan, Tally
from chatdb.lifecycle.phases import PURGED, Apply, Phase, Taken, delete_messages, taken_from
from chatdb.lifecycle.statements import archivable, ids_param, keyed, keys_bound, restorable, skip_locked
from chatdb.schema import (
    CITUS_LOCAL_TABLES,
    DISTRIBUTED_TABLES,
    DISTRIBUTION_COLUMN,
    conversations,
    conversations_archive,
    messages,
    messages_archive,
)

#: A user of a pass: (the ordinal of their shard, user_id).
Entry = tuple[int, str]

#: The id of a position that is past all of its user's rows (see ``by_shard``).
PAST_USER = uuid.UUID(int=(1 << 128) - 1)


def applies(engine: Engine) -> bool:
    """Whether chatdb's tables are distributed on this database (a Citus coordinator). A
    StateError when they are but not all of them by user_id and co-located (a batch's
    statements would each run on several nodes), or the audit table is not a Citus local
    table (a database distributed by an earlier chatdb): each batch would commit on its
    worker in one phase, apart from its audit row."""
    with engine.connect() as connection:
        layout = citus.cluster(connection)
    if layout is None or layout.kind(DISTRIBUTED_TABLES[0].name) != citus.DISTRIBUTED:
        return False
    citus.require_layout(layout)
    apart = [table.name for table in CITUS_LOCAL_TABLES if layout.kind(table.name) != citus.CITUS_LOCAL]
    if apart:
        raise StateError(
            f"{', '.join(apart)} is not in Citus's metadata, so a batch would not commit together "
            "with its audit row; run chatdb migrate",
            hint='see README.md, "Running on Citus"',
        )
    return True


def _bound(statement: str) -> TextClause:
    return keys_bound(text(statement))


class Shards:
    """The users a pass works through, sorted by (shard's ordinal, user_id), as a phase
    found them at the start of its latest pass. Shared by the run's workers."""

    def __init__(self, table: Table, condition: Any) -> None:
        self.table = table
        self.condition = condition
        self.entries: list[Entry] = []
        self.lock = threading.Lock()

    def discover(self, connection: Connection) -> None:
        """Which users have matching rows now, and on which shard: a plain read over every
        shard, which locks nothing, at the start of a pass (``Phase.starts``: in a
        transaction of its own, before any batch)."""
        users = list(
            connection.execute(select(self.table.c.user_id).where(self.condition).distinct()).scalars()
        )
        rows = connection.execute(
            text(
                "SELECT u, get_shard_id_for_distribution_column(CAST(:table AS regclass), u)"
                " FROM unnest(CAST(:users AS text[])) AS u"
            ),
            {"table": self.table.name, "users": users},
        ).all()
        ordinal = {shard: n for n, shard in enumerate(sorted({shard for _, shard in rows}))}
        entries = sorted((ordinal[shard], user) for user, shard in rows)
        with self.lock:
            self.entries = entries

    def chunk(self, start: Entry, most: int) -> tuple[list[Entry], Entry | None]:
        """Up to ``most`` users of one shard from ``start`` on, and where the next chunk
        starts (None at the end of the pass)."""
        with self.lock:
            entries = self.entries
        first = bisect.bisect_left(entries, start)
        chosen = []
        for entry in entries[first : first + most]:
            if entry[0] != entries[first][0]:
                break
            chosen.append(entry)
        after = first + len(chosen)
        return chosen, (entries[after] if after < len(entries) else None)


def _pick(table: Table, condition: Any, users: list[str], limit: int, after: tuple | None) -> Select:
    """Lock (SKIP LOCKED) up to ``limit`` rows of ``users`` (all on one shard) matching
    ``condition``, after the row ``after`` = (user_id, id) if given, in (user_id, id)
    order, and return their ``(user_id, id)``."""
    c = table.c
    query = select(c.user_id, c.id).where(c.user_id == any_(literal(users, ARRAY(TEXT))), condition)
    if after is not None:
        query = query.where(~((c.user_id == after[0]) & (c.id <= after[1])))
    return skip_locked(query.order_by(collate(c.user_id, "C"), c.id).limit(limit))


def by_shard(table: Table, condition: Any, apply: Apply) -> tuple[Callable[..., Taken], Shards]:
    """A phase's ``take`` on distributed tables: lock up to ``limit`` rows of ``table``
    matching ``condition`` of the next users of one shard after the position ``after`` =
    (ordinal, user_id, id), and ``apply`` to them, all as router queries; and the
    ``Shards`` whose ``discover`` starts each pass (outside any batch).

    A batch tries one chunk of users. When it finds every matching row of that chunk
    held by other sessions (or taken by another worker), it picks nothing and moves the
    position past the chunk (``last`` is the chunk's last user with ``PAST_USER``): the
    next batch, in a transaction of its own, tries the next chunk. The sweep after the
    pass comes back for the rows passed over."""
    shards = Shards(table, condition)

    def take(connection: Connection, limit: int, after: tuple | None) -> Taken:
        start: Entry = (-1, "")
        row = None  # the row after which to go on, when the chunk starts with the position's user
        if after is not None:
            ordinal, user, last_id = after
            if last_id == PAST_USER:
                start = (ordinal, user + "\0")  # the next user in Python's (and C's) order
            else:
                start, row = (ordinal, user), (user, last_id)
        chosen, _ = shards.chunk(start, limit)
        if not chosen:
            return Taken()
        ordinal = chosen[0][0]
        users = [user for _, user in chosen]
        rows = connection.execute(_pick(table, condition, users, limit, row)).all()
        if not rows:
            return Taken(0, (ordinal, users[-1], PAST_USER))
        users, ids = [row[0] for row in rows], [row[1] for row in rows]
        last = (ordinal, rows[-1][0], rows[-1][1])
        return Taken(len(rows), last, apply(connection, ids, users), ids, users)

    return take, shards


# --- what a batch does, one shard at a time --------------------------------------------------


def _names(table: Table) -> str:
    return ", ".join(f'"{column.name}"' for column in table.c)


def _copy_rows(source: Table, target: Table, columns: Table, condition: str) -> TextClause:
    """Insert into ``target`` the rows of the batch's users in ``source`` that ``condition``
    picks: the columns of ``columns``, the hot table, which its archive has too (with
    ``archived_at`` besides)."""
    names = _names(columns)
    return _bound(
        f'INSERT INTO "{target.name}" ({names}) SELECT {names} FROM "{source.name}"'
        f" WHERE user_id = ANY(:users) AND {condition}"
    )


@cache
def _copy(source: Table, target: Table) -> TextClause:
    """Insert into ``target`` the batch's conversations of ``source`` (locked by the
    batch: they cannot change between this copy and their delete)."""
    return _copy_rows(source, target, conversations, keyed())


@cache
def _copy_messages(source: Table, target: Table) -> TextClause:
    """Lock the messages of the batch's conversations and insert them into ``target``, in
    one statement. Their conversations are locked already, so no message can be added to
    them; a message the application changed meanwhile is locked in its newest version,
    which is the one copied, and none can change between this copy and the delete that
    follows (on one server, one ``DELETE ... RETURNING`` feeding an ``INSERT`` does both:
    Citus would carry those rows through the coordinator). The row count is the
    messages copied."""
    return _copy_rows(source, target, messages, f"{keyed('conversation_id')} FOR UPDATE")


@cache
def _delete_conversations(parent: Table, child: Table) -> TextClause:
    """Delete the batch's conversations of ``parent`` and their messages of ``child``, in
    one statement (two data-modifying CTEs on the same shard: one router task), and
    return how many of each. The batch locked the conversations in an earlier statement,
    so this statement's snapshot sees every message committed before the lock, and no
    message can be added since: the messages' count is exact, and the foreign key's
    cascade, which runs once the statement has finished, finds none left."""
    return _bound(
        f'WITH gone_messages AS (DELETE FROM "{child.name}" WHERE user_id = ANY(:users)'
        f" AND {keyed('conversation_id')} RETURNING 1),"
        f' gone AS (DELETE FROM "{parent.name}" WHERE user_id = ANY(:users) AND {keyed()} RETURNING 1)'
        " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM gone_messages)"
    )


@cache
def _delete(table: Table) -> TextClause:
    return _bound(f'DELETE FROM "{table.name}" WHERE user_id = ANY(:users) AND {keyed()}')


def _mover(parent: Table, child: Table, to_parent: Table, to_child: Table, hot: bool) -> Apply:
    """Move the batch's (locked) conversations of ``parent`` with their messages of
    ``child`` into ``to_parent`` and ``to_child``: three router statements after the
    lock (copy the conversations; lock and copy the messages; delete both). ``hot``: they
    leave the hot tables (archive), or the archive (restore)."""

    def apply(connection: Connection, ids: list[uuid.UUID], users: list[str]) -> Tally:
        params = {"users": users, "ids": ids}
        connection.execute(_copy(parent, to_parent), params)
        moved_messages = connection.execute(_copy_messages(child, to_child), params).rowcount
        moved, deleted_messages = connection.execute(_delete_conversations(parent, child), params).one()
        if deleted_messages != moved_messages:  # cannot happen while the messages are locked
            raise StateError(
                f"a batch copied {moved_messages} messages and deleted {deleted_messages}; it rolled back"
            )
        return taken_from(hot, moved, moved_messages)

    return apply


#: Archive a batch: conversations and their messages, from the hot tables.
archive_batch = _mover(conversations, messages, conversations_archive, messages_archive, True)
#: Restore a batch: archived conversations and their messages, back to the hot tables.
restore_batch = _mover(conversations_archive, messages_archive, conversations, messages, False)


def delete_conversations(parent: Table, child: Table, hot: bool) -> Apply:
    """Delete the batch's conversations and their messages, and count both exactly (see
    ``_delete_conversations``)."""

    def apply(connection: Connection, ids: list[uuid.UUID], users: list[str]) -> Tally:
        params = {"users": users, "ids": ids}
        n_conversations, n_messages = connection.execute(_delete_conversations(parent, child), params).one()
        return taken_from(hot, n_conversations, n_messages)

    return apply


# --- the commands' phases ------------------------------------------------------------------


def _phase(
    name: str, table: Table, condition: Any, apply: Apply, *, export: bool = False, fills: bool = False
) -> Phase:
    take, shards = by_shard(table, condition, apply)
    pending = select(exists().where(condition))
    return Phase(name, take, pending, export=export, fills=fills, starts=shards.discover, durable=True)


def archive_phases(plan: Plan) -> list[Phase]:
    """``archive`` on distributed tables: idle conversations, one shard per batch, moved
    with their messages and exported."""
    return [
        _phase(
            "archive idle conversations",
            conversations,
            archivable(plan.cutoff),
            archive_batch,
            export=True,
            fills=True,
        )
    ]


def purge_phases(plan: Plan) -> list[Phase]:
    """``purge`` on distributed tables: the phases of one server, one shard per batch."""
    grace = plan.deleted_cutoff
    phases = []
    for parent, child, hot, where in PURGED:
        gone = delete_conversations(parent, child, hot)
        phases += [
            _phase(f"idle conversations{where}", parent, parent.c.updated_at < plan.cutoff, gone),
            _phase(
                f"soft-deleted conversations{where}",
                parent,
                parent.c.deleted_at.is_not(None) & (parent.c.deleted_at < grace),
                gone,
            ),
            _phase(
                f"soft-deleted messages{where}",
                child,
                child.c.deleted_at.is_not(None) & (child.c.deleted_at < grace),
                delete_messages(child, hot, _delete),
            ),
        ]
    return phases


def restore_phases(plan: Plan) -> list[Phase]:
    """``archive restore`` on distributed tables: the chosen archived conversations, one
    shard per batch, moved back with their messages."""
    chosen = restorable(plan.conversation_ids, plan.user_id)
    c = conversations_archive.c
    if plan.conversation_ids:
        condition = c.id == any_(ids_param(plan.conversation_ids))
    else:
        condition = c.user_id == plan.user_id
    take, shards = by_shard(conversations_archive, condition, restore_batch)
    return [
        Phase(
            "restore archived conversations",
            take,
            select(exists(chosen)),
            fills=True,
            starts=shards.discover,
            durable=True,
        )
    ]


def phases_for(command: str, plan: Plan) -> Sequence[Phase]:
    """The phases of ``command`` (a ``Plan.command``) on distributed tables."""
    by_command = {"archive": archive_phases, "purge": purge_phases, "archive restore": restore_phases}
    return by_command[command](plan)


assert DISTRIBUTION_COLUMN == "user_id"  # the statements above name it
