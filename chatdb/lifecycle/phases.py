"""Phases: which rows each command takes, in which order, and what one batch does with
them, put together from the statements of ``chatdb.lifecycle.statements``.

A command is a list of phases (``archive_phases``, ``purge_phases``, ``restore_phases``)
that the runner drains one after the other. See docs/architecture.md, "Phases" and
"Physical order and keyset order"."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Select, Table, TextClause, exists, select

from chatdb import patterns
from chatdb.lifecycle import statements
from chatdb.lifecycle.models import Plan, Tally
from chatdb.lifecycle.statements import WINDOW, archivable, delete_keyed, restorable
from chatdb.schema import conversations, conversations_archive, messages, messages_archive

#: What one batch does with the rows it locked, in its transaction: ``apply(connection,
#: ids, users)``, each row's id and user_id (its key: see ``statements.KEYS``).
Apply = Callable[[Connection, list[uuid.UUID], list[str]], Tally]


@dataclass
class Taken:
    """What one batch did: the rows it picked (and locked), the position after them (see
    Phase), its counts, and the keys of the conversations it took (for the export): their
    ids and, in the same order, their users. A
    keyset batch that picked nothing but has a ``last`` found only rows other sessions
    hold up to that position: the pass goes on after it."""

    picked: int = 0
    last: Any = None
    tally: Tally = field(default_factory=Tally)
    ids: list[uuid.UUID] = field(default_factory=list)
    users: list[str] = field(default_factory=list)


#: ``take(connection, limit, after)``: see Phase.
Take = Callable[[Connection, int, Any], Taken]


@dataclass(frozen=True)
class Phase:
    """One kind of work: which rows, in which order, and what to do with a batch of them.

    ``take(connection, limit, after)`` locks up to ``limit`` matching rows FOR UPDATE
    SKIP LOCKED and deals with them, in the batch's transaction. Keyset phases go in
    index order: ``after`` is the position (key, id) of the last row taken, shared by
    the run's workers. With ``blocks`` set, the phase goes through that table in
    physical order (see in_blocks): ``after`` is a window (ctid, end block) that one
    worker claimed. ``pending`` is true while any row still matches (locked or not).
    ``fills`` marks a phase that inserts into tables it makes grow, perhaps from empty
    (see Batches.replan). ``starts(connection)``, when set, runs at the start of each
    pass, in a transaction of its own on the run's connection, before any batch (on
    Citus: which users have matching rows, see ``chatdb.lifecycle.distributed``).
    ``durable`` batches commit with ``synchronous_commit`` on even when they export
    nothing: on Citus a batch's commit is two-phase, across the coordinator (the audit
    row) and a worker (the rows), and a crash must not lose the coordinator's part of a
    commit whose worker part is kept."""

    name: str
    take: Take
    pending: Select
    export: bool = False
    fills: bool = False
    blocks: Table | None = None
    starts: Callable[[Connection], None] | None = None
    durable: bool = False


# --- what a batch does with its rows -----------------------------------------------------


def taken_from(hot: bool, conversations: int, messages: int) -> Tally:
    """The counts of a batch that took conversations (and their messages) out of the hot
    tables or out of the archive: moved, or deleted."""
    if hot:
        return Tally(conversations=conversations, messages=messages)
    return Tally(archive_conversations=conversations, archive_messages=messages)


def _mover(copy: TextClause, move: TextClause, source: Table, hot: bool) -> Apply:
    """Copy the batch's conversations (``copy``), move their messages (``move``), and
    delete the conversations from ``source``. No message remains to cascade to: adding
    one needs a lock on its conversation, which the batch's transaction holds."""

    def apply(connection: Connection, ids: list[uuid.UUID], users: list[str]) -> Tally:
        params = {"ids": ids, "users": users}
        connection.execute(copy, params)
        moved_messages = connection.execute(move, params).rowcount
        moved = connection.execute(delete_keyed(source), params).rowcount
        return taken_from(hot, moved, moved_messages)

    return apply


#: Archive a batch: conversations and their messages, from the hot tables.
archive_batch = _mover(statements.archive_conversations(), statements.archive_messages(), conversations, True)
#: Restore a batch: archived conversations and their messages, back to the hot tables.
restore_batch = _mover(
    statements.restore_conversations(), statements.restore_messages(), conversations_archive, False
)


def delete_conversations(parent: Table, child: Table, hot: bool) -> Apply:
    def apply(connection: Connection, ids: list[uuid.UUID], users: list[str]) -> Tally:
        keys = {"ids": ids, "users": users}
        before, counted = connection.execute(statements.xact_deleted(), {"table": child.name}).one()
        if counted:
            # The foreign key's cascade deletes the messages, one index probe per
            # conversation; this transaction's own statistics count them exactly.
            n_conversations = connection.execute(delete_keyed(parent), keys).rowcount
            n_messages = (
                connection.execute(statements.xact_deleted(), {"table": child.name}).scalar_one() - before
            )
        else:
            n_messages = connection.execute(delete_keyed(child, "conversation_id"), keys).rowcount
            n_conversations = connection.execute(delete_keyed(parent), keys).rowcount
        return taken_from(hot, n_conversations, n_messages)

    return apply


def delete_messages(
    table: Table, hot: bool, statement: Callable[[Table], TextClause] = delete_keyed
) -> Apply:
    """Delete the batch's messages of ``table`` with ``statement(table)`` (on Citus, one
    confined to the batch's shard)."""

    def apply(connection: Connection, ids: list[uuid.UUID], users: list[str]) -> Tally:
        n = connection.execute(statement(table), {"ids": ids, "users": users}).rowcount
        return taken_from(hot, 0, n)

    return apply


#: The tables ``purge`` goes through, the hot ones first: (conversations' table, their
#: messages' table, whether hot, the suffix of the phases' names).
PURGED = (
    (conversations, messages, True, ""),
    (conversations_archive, messages_archive, False, " (archive)"),
)


def export_lines(connection: Connection, ids: Sequence[uuid.UUID], users: Sequence[str]) -> list[str]:
    """The export's lines of the conversations a batch just archived, by their keys (see
    ``statements.export_lines``)."""
    params = {"ids": list(ids), "users": list(users)}
    return list(connection.execute(statements.export_lines(), params).scalars())


# --- how a phase takes its rows ------------------------------------------------------------


def keyset(pick: Callable[[int, tuple | None], Select], apply: Apply) -> Take:
    """A keyset phase: ``pick(limit, after)`` selects ``(id, key, user_id)`` of the rows
    after ``after`` = (key, id), in (key, id) order; ``apply`` deals with them."""

    def take(connection: Connection, limit: int, after: tuple | None) -> Taken:
        rows = connection.execute(statements.skip_locked(pick(limit, after))).all()
        if not rows:
            return Taken()
        ids, users = [row[0] for row in rows], [row[2] for row in rows]
        return Taken(len(rows), (rows[-1][1], rows[-1][0]), apply(connection, ids, users), ids, users)

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


def tid(raw: str) -> tuple[int, int]:
    """``(block, offset)`` of a ctid in its text form, ``"(12,3)"``."""
    block, offset = raw.strip("()").split(",")
    return int(block), int(offset)


def in_blocks(table: Table, condition: Any, apply: Apply, window: str = WINDOW) -> Take:
    """A phase in physical order whose ``apply`` deals with the rows of ``table``
    matching ``condition``. ``window`` is the condition on ctid that keeps a
    batch in its window (see ``statements.WINDOW``)."""

    def take(connection: Connection, limit: int, claimed: tuple[str, int]) -> Taken:
        after, end = claimed
        query = statements.pick_in_window(table, condition, after, end, limit, window)
        rows = connection.execute(query).all()
        if not rows:
            return Taken()
        ids, users = [row[0] for row in rows], [row[2] for row in rows]
        lower, upper = tid(after), (end, 0)
        inside = [position for position in (tid(row[1]) for row in rows) if lower < position < upper]
        last = "({},{})".format(*max(inside)) if inside else None
        return Taken(len(rows), last, apply(connection, ids, users), ids, users)

    return take


def counts_tracked(connection: Connection) -> bool:
    """Whether this session counts the rows it changes (track_counts), asked once per
    connection."""
    if "track_counts" not in connection.info:
        connection.info["track_counts"] = connection.execute(statements.track_counts()).scalar_one()
    return connection.info["track_counts"]


def purge_in_blocks(parent: Table, child: Table, hot: bool, cutoff: Any, window: str = WINDOW) -> Take:
    """Idle conversations of ``parent`` deleted in physical order, picked and deleted by
    one statement (``statements.purge_idle``). The foreign key's cascade deletes their
    messages, one index probe per conversation, and this transaction's own statistics
    count them exactly: the statement reads the count before the cascade (which runs once
    it has finished), a query after it the count after.

    A session without statistics (track_counts off) takes the longer way: it locks the
    conversations, then deletes and counts their messages in a statement of its own,
    whose snapshot sees every message committed before the lock (one statement's
    snapshot could miss one, which the cascade would then delete uncounted)."""
    statement = statements.purge_idle(parent, window)
    uncounted = in_blocks(
        parent, parent.c.updated_at < cutoff, delete_conversations(parent, child, hot), window
    )

    def take(connection: Connection, limit: int, claimed: tuple[str, int]) -> Taken:
        if not counts_tracked(connection):
            return uncounted(connection, limit, claimed)
        after, end = claimed
        params = {"cutoff": cutoff, "after": after, "end": f"({end},0)", "limit": limit, "table": child.name}
        # The session's counts not yet reported include earlier transactions': the
        # cascade's are the difference.
        before, picked, n_conversations, last = connection.execute(statement, params).one()
        if not picked:
            return Taken()
        n_messages = connection.execute(statements.xact_deleted(), {"table": child.name}).one()[0] - before
        return Taken(picked, last, taken_from(hot, n_conversations, n_messages))

    return take


# --- the commands' phases ------------------------------------------------------------------


def archive_phases(plan: Plan, window: str = WINDOW) -> list[Phase]:
    """``archive``: idle conversations, in physical order, moved with their messages and
    exported."""
    return [
        Phase(
            "archive idle conversations",
            in_blocks(conversations, archivable(plan.cutoff), archive_batch, window),
            select(exists().where(archivable(plan.cutoff))),
            export=True,
            fills=True,
            blocks=conversations,
        )
    ]


def _soft_deleted(table: Table, cutoff: Any) -> Callable[[int, tuple | None], Select]:
    """The pick of a keyset phase: rows of ``table`` soft-deleted before ``cutoff``
    (``patterns.soft_deleted``), with their users."""

    def pick(limit: int, after: tuple | None) -> Select:
        return patterns.soft_deleted(table, cutoff, limit, after).add_columns(table.c.user_id)

    return pick


def purge_phases(plan: Plan, window: str = WINDOW) -> list[Phase]:
    """``purge``: from the hot tables, then from the archive, idle conversations (in
    physical order, each batch in one statement), soft-deleted conversations and
    soft-deleted messages (in keyset order). ``window`` is the condition on ctid of the
    batches in physical order (see ``statements.WINDOW``)."""
    grace = plan.deleted_cutoff
    phases = []
    for parent, child, hot, where in PURGED:
        phases += [
            Phase(
                f"idle conversations{where}",
                purge_in_blocks(parent, child, hot, plan.cutoff, window),
                select(exists().where(parent.c.updated_at < plan.cutoff)),
                blocks=parent,
            ),
            Phase(
                f"soft-deleted conversations{where}",
                keyset(_soft_deleted(parent, grace), delete_conversations(parent, child, hot)),
                select(exists().where(parent.c.deleted_at < grace)),
            ),
            Phase(
                f"soft-deleted messages{where}",
                keyset(_soft_deleted(child, grace), delete_messages(child, hot)),
                select(exists().where(child.c.deleted_at < grace)),
            ),
        ]
    return phases


def restore_phases(plan: Plan) -> list[Phase]:
    """``archive restore``: the chosen archived conversations, in id order, moved back
    with their messages."""
    c = conversations_archive.c
    chosen = restorable(plan.conversation_ids, plan.user_id)

    def pick(limit: int, after: tuple | None) -> Select:
        query = chosen.add_columns(c.id, c.user_id)  # (id, key, user_id): the key is the id itself
        if after is not None:
            query = query.where(c.id > after[1])
        return query.order_by(c.id).limit(limit)

    return [
        Phase(
            "restore archived conversations",
            keyset(pick, restore_batch),
            select(exists(chosen)),
            fills=True,
        )
    ]
