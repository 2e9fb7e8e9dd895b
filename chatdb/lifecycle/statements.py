"""Every statement a lifecycle batch sends to the data tables, and the conditions that
choose their rows.

Each function says what its statement guarantees; ``chatdb.lifecycle.phases`` puts them
together into phases, and ``chatdb.lifecycle.audit`` holds the statements on the run's
audit row. A variant of the lifecycle (another layout of the tables, say) varies these
and keeps the runner. Identifiers come from ``chatdb.schema``, never from input; values
are bound parameters. Statements without data in them are built once (``cache``).

Why each statement is safe: docs/architecture.md, "What is locked, and what is
re-checked", "Physical order and keyset order" and "What is counted, and in which
transaction".
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Select,
    Table,
    Text,
    TextClause,
    any_,
    bindparam,
    literal,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import UUID

from chatdb.schema import conversations, conversations_archive, messages, messages_archive

#: Every batch's transaction, and the intent's (see ``batch_settings``).
LOCK_TIMEOUT = "500ms"
STATEMENT_TIMEOUT = "60s"

# --- which rows -------------------------------------------------------------------------


def ids_param(ids: Sequence[uuid.UUID]) -> Any:
    """The ids, bound as one ``uuid[]`` parameter (one statement whatever their number)."""
    return literal(list(ids), ARRAY(UUID(as_uuid=True)))


#: The rows a batch took, by their whole key: ``:ids`` and ``:users`` are parallel arrays,
#: each row's id and user_id. Since revision 0007 an id is unique only with its user_id: two
#: users' rows may share an id (a client that chose it, an import), and a batch that went
#: by id alone would take the other user's row too.
KEYS = "(SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:users AS text[])))"


def keyed(column: str = "id", alias: str = "") -> str:
    """The condition that a row is one of the batch's (``KEYS``): its ``column`` (its own id,
    or its conversation's) paired with its user_id. An index on (``column``, user_id)
    finds each key with one probe (the primary keys, idx_messages_conversation_owner)."""
    on = f"{alias}." if alias else ""
    return f'({on}"{column}", {on}user_id) IN {KEYS}'


def archivable(cutoff: Any) -> ColumnElement[bool]:
    """The conversations ``archive`` takes: idle since before ``cutoff`` and not
    soft-deleted. ``status`` (the application's own flag) is never read."""
    c = conversations.c
    return (c.updated_at < cutoff) & c.deleted_at.is_(None)


def purgeable(table: Table, cutoff: Any, deleted_cutoff: Any) -> ColumnElement[bool]:
    """The rows of ``table`` that ``purge`` deletes: idle since before ``cutoff``, or
    soft-deleted before ``deleted_cutoff`` (a conversation idle past the retention age
    goes even when it was soft-deleted within its grace period)."""
    c = table.c
    return or_(c.updated_at < cutoff, c.deleted_at < deleted_cutoff)


def restorable(ids: Sequence[uuid.UUID], user_id: str | None) -> Select:
    """The ids of the archived conversations ``archive restore`` brings back: the named
    ones (every user's conversation of each id), or all of a user's."""
    c = conversations_archive.c
    if ids:
        return select(c.id).where(c.id == any_(ids_param(ids)))
    return select(c.id).where(c.user_id == user_id)


def skip_locked(query: Select) -> Select:
    """Lock the rows ``query`` returns, passing over rows another session holds. In READ
    COMMITTED, PostgreSQL evaluates the WHERE clause again on the newest version of a row
    once it is locked: a row changed meanwhile so that it no longer matches is not
    taken."""
    return query.with_for_update(skip_locked=True)


# --- each batch's transaction -----------------------------------------------------------


@cache
def batch_settings() -> TextClause:
    """The settings of a batch's transaction, local to it (``set_config(..., true)``), so
    nothing stays on a pooled server connection: ``:lock`` and ``:statement`` timeouts,
    ``synchronous_commit`` (``:commit``) and ``TimeZone`` UTC."""
    return text(
        "SELECT set_config('lock_timeout', :lock, true),"
        " set_config('statement_timeout', :statement, true),"
        # A batch lost by a server crash is simply done again; but an export's lines
        # stay in the file, so a batch that exports is committed for good before
        # chatdb hears so.
        " set_config('synchronous_commit', :commit, true),"
        " set_config('TimeZone', 'UTC', true)"
    )


@cache
def discard_plans() -> TextClause:
    """Forget the plans cached in the session, so that the foreign-key checks of rows
    inserted from now on are planned for the tables as they are now (see
    ``Batches.replan``)."""
    return text("DISCARD PLANS")


@cache
def relation_blocks() -> TextClause:
    """The length in blocks of the table ``:table``, the end of a pass in physical order.
    Blocks added later hold rows written since; the sweep after the pass finds any that
    match."""
    return text("SELECT pg_relation_size(CAST(:table AS regclass)) / current_setting('block_size')::int")


# --- physical order ---------------------------------------------------------------------

#: A window of a table's blocks: the rows after the ctid ``:after`` and before block
#: ``:end`` (a TID range scan).
WINDOW = "ctid > CAST(:after AS tid) AND ctid < CAST(:end AS tid)"


def pick_in_window(
    table: Table, condition: Any, after: str, end: int, limit: int, window: str = WINDOW
) -> Select:
    """Lock (SKIP LOCKED) up to ``limit`` rows of ``table`` matching ``condition`` in the
    window after the ctid ``after`` and before block ``end``, and return their
    ``(id, ctid, user_id)``. The scan returns rows in ctid order, so the LIMIT stops it early;
    there is no ORDER BY, which would read the whole rest of the window for every batch.
    Nothing relies on that order for correctness: a row passed over still matches, and
    the sweep after the pass takes it."""
    query = select(table.c.id, literal_column("CAST(ctid AS text)"), table.c.user_id).where(
        condition, text(window).bindparams(after=after, end=f"({end},0)")
    )
    return skip_locked(query.limit(limit))


@cache
def purge_idle(parent: Table, window: str = WINDOW) -> TextClause:
    """Lock and delete, in one statement, up to ``:limit`` conversations of ``parent``
    idle since before ``:cutoff`` in the window (``:after``, ``:end``); the foreign key's
    cascade deletes their messages. It returns the count of ``:table`` (their messages'
    table) deleted by this transaction before the cascade runs (which it does once the
    statement has finished), how many rows it locked, how many it deleted, and the
    largest ctid it locked inside the window.

    The delete goes by key (id and user_id: see ``KEYS``) and checks the cutoff again: a
    conversation updated (still idle) after the statement began is locked in its new
    version, which the statement's snapshot does not see; by key, the delete follows the
    update to the version locked."""
    cascaded = "pg_stat_get_xact_tuples_deleted(CAST(:table AS regclass))"
    return text(
        f'WITH picked AS (SELECT id, user_id, ctid FROM "{parent.name}" WHERE updated_at < :cutoff'
        f" AND {window} LIMIT :limit FOR UPDATE SKIP LOCKED),"
        f' gone AS (DELETE FROM "{parent.name}" WHERE id = ANY(ARRAY(SELECT id FROM picked))'
        " AND (id, user_id) IN (SELECT id, user_id FROM picked)"
        " AND updated_at < :cutoff RETURNING id)"
        f" SELECT {cascaded}, (SELECT count(*) FROM picked), (SELECT count(*) FROM gone),"
        f" CAST((SELECT max(ctid) FROM picked WHERE {window}) AS text)"
    )


# --- moving and deleting ----------------------------------------------------------------


def keys_bound(statement: TextClause) -> TextClause:
    """``statement`` with ``:ids`` and ``:users`` bound as arrays (``KEYS``)."""
    return statement.bindparams(
        bindparam("ids", type_=ARRAY(UUID(as_uuid=True))), bindparam("users", type_=ARRAY(Text()))
    )


@cache
def move_rows(source: Table, target: Table, key: str, columns: Table) -> TextClause:
    """Delete the rows of ``source`` whose ``key`` and user_id are one of the batch's
    (``keyed``) and insert them into ``target``, in one statement: a row changed
    concurrently is moved in its newest version, never an older copy of it. The
    statement's row count is the rows moved."""
    names = ", ".join(f'"{column.name}"' for column in columns.c)
    return keys_bound(
        text(
            f'WITH moved AS (DELETE FROM "{source.name}" WHERE {keyed(key)} RETURNING {names})'
            f' INSERT INTO "{target.name}" ({names}) SELECT {names} FROM moved'
        )
    )


@cache
def copy_conversations(source: Table, target: Table) -> TextClause:
    """Insert into ``target`` the batch's conversations of ``source`` (``keyed``), with
    every column of ``conversations`` (the archive's ``archived_at`` takes its default).
    The batch has them locked: they cannot change between this copy and their delete."""
    names = ", ".join(f'"{column.name}"' for column in conversations.c)
    return keys_bound(
        text(f'INSERT INTO "{target.name}" ({names}) SELECT {names} FROM "{source.name}" WHERE {keyed()}')
    )


def archive_conversations() -> TextClause:
    """Copy the batch's conversations into ``conversations_archive``."""
    return copy_conversations(conversations, conversations_archive)


def archive_messages() -> TextClause:
    """Move the batch's conversations' messages into ``messages_archive``."""
    return move_rows(messages, messages_archive, "conversation_id", messages)


def restore_conversations() -> TextClause:
    """Copy the batch's archived conversations back into ``conversations``."""
    return copy_conversations(conversations_archive, conversations)


def restore_messages() -> TextClause:
    """Move the batch's archived messages back into ``messages``."""
    return move_rows(messages_archive, messages, "conversation_id", messages)


@cache
def delete_keyed(table: Table, key: str = "id") -> TextClause:
    """Delete the rows of ``table`` whose ``key`` (their id, or their conversation's) and
    user_id are one of the batch's (``keyed``). The batch holds the rows (or their
    conversations) locked; the row count is the rows deleted."""
    return keys_bound(text(f'DELETE FROM "{table.name}" WHERE {keyed(key)}'))


@cache
def xact_deleted() -> TextClause:
    """The rows of ``:table`` deleted so far by this session, its current transaction
    included (``pg_stat_get_xact_tuples_deleted``), and whether the session counts them
    at all (``track_counts``). The difference around a delete counts what its cascade
    deleted, exactly, whatever else runs at the same time."""
    return text(
        "SELECT pg_stat_get_xact_tuples_deleted(CAST(:table AS regclass)),"
        " current_setting('track_counts')::bool"
    )


@cache
def track_counts() -> TextClause:
    """Whether this session counts the rows it changes (``track_counts``)."""
    return text("SELECT current_setting('track_counts')::bool")


# --- the export -------------------------------------------------------------------------


@cache
def export_lines() -> TextClause:
    """One JSON object per conversation the batch just archived (``keyed``), with its
    messages, as it was in the hot tables: without ``archived_at``, so that a batch
    written twice gives identical lines, and in a fixed order (conversations by
    ``(updated_at, id)``, messages by ``(created_at, id)``). Built by the server from the
    rows the batch's own transaction just wrote. ``user_id = ANY(:users)`` confines it,
    on Citus, to the batch's shard (a router query)."""
    return keys_bound(
        text(
            "SELECT jsonb_build_object("
            " 'conversation', to_jsonb(c) - 'archived_at',"
            " 'messages', coalesce((SELECT jsonb_agg(to_jsonb(m) - 'archived_at'"
            "   ORDER BY m.created_at, m.id) FROM messages_archive m"
            "   WHERE m.user_id = c.user_id AND m.conversation_id = c.id), '[]'::jsonb))::text"
            f" FROM conversations_archive c WHERE c.user_id = ANY(:users) AND {keyed('id', 'c')}"
            " ORDER BY c.updated_at, c.id"
        )
    )
