"""The application's query patterns, written once.

The chatbot's backend can import these; ``verify-indexes`` runs ``EXPLAIN`` on these very
statements, and load benchmarks drive them. Each pattern names the index that serves it
(see ``chatdb.schema``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Connection, Insert, Select, Table, Update, func, insert, select, tuple_, update

from chatdb.schema import conversations, conversations_archive, messages


def recent_conversations(user_id: str, limit: int = 50) -> Select:
    """Pattern 1: a user's recent active conversations."""
    c = conversations.c
    return (
        select(conversations)
        .where(c.user_id == user_id, c.status == "active", c.deleted_at.is_(None))
        .order_by(c.updated_at.desc())
        .limit(limit)
    )


def conversation_history(
    conversation_id: uuid.UUID,
    limit: int = 20,
    *,
    include_deleted: bool = False,
    user_id: str | None = None,
) -> Select:
    """Pattern 2: a conversation's history, newest first (the caller reverses it).
    ``include_deleted`` drops the soft-delete filter: the same query without it, which is
    what the filter's cost is measured against. ``user_id``, the conversation's owner:
    on Citus it sends the query to the one shard of that user (without it, to all)."""
    m = messages.c
    query = select(messages).where(m.conversation_id == conversation_id)
    if user_id is not None:
        query = query.where(m.user_id == user_id)
    if not include_deleted:
        query = query.where(m.deleted_at.is_(None))
    return query.order_by(m.created_at.desc()).limit(limit)


def message_by_id(message_id: uuid.UUID, user_id: str | None = None) -> Select:
    """One message by its id (served by the primary key, ``(id, user_id)``). ``user_id``,
    the message's owner: on Citus it sends the query to the one shard of that user."""
    m = messages.c
    query = select(messages).where(m.id == message_id, m.deleted_at.is_(None))
    return query if user_id is None else query.where(m.user_id == user_id)


def idle_conversations(
    table: Table,
    cutoff: Any,
    limit: int,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
) -> Select:
    """Pattern 3: conversations (hot or archived) idle since before ``cutoff``, oldest
    first, one keyset page after ``after`` = (updated_at, id)."""
    c = table.c
    query = select(c.id, c.updated_at).where(c.updated_at < cutoff)
    if after is not None:
        query = query.where(tuple_(c.updated_at, c.id) > tuple_(*after))
    return query.order_by(c.updated_at, c.id).limit(limit)


def soft_deleted(
    table: Table,
    cutoff: Any,
    limit: int,
    after: tuple[dt.datetime, uuid.UUID] | None = None,
) -> Select:
    """Pattern 4: rows soft-deleted before ``cutoff``, one keyset page in (deleted_at, id)
    order."""
    c = table.c
    query = select(c.id, c.deleted_at).where(c.deleted_at.is_not(None), c.deleted_at < cutoff)
    if after is not None:
        query = query.where(tuple_(c.deleted_at, c.id) > tuple_(*after))
    return query.order_by(c.deleted_at, c.id).limit(limit)


def user_messages(user_id: str, limit: int = 50) -> Select:
    """Pattern 5: a user's messages, newest first (also what deleting a user scans)."""
    m = messages.c
    return select(messages).where(m.user_id == user_id).order_by(m.created_at.desc()).limit(limit)


def add_message(
    connection: Connection,
    conversation_id: uuid.UUID,
    user_id: str,
    role: str,
    content: str,
    **columns: Any,
) -> uuid.UUID:
    """Insert a message and bump the conversation's ``updated_at`` in one transaction, the
    way the application writes. Returns the new message's id."""
    add, bump = add_message_statements(conversation_id, user_id, role, content, **columns)
    with connection.begin_nested() if connection.in_transaction() else connection.begin():
        message_id = connection.execute(add).scalar_one()
        connection.execute(bump)
    return message_id


def add_message_statements(
    conversation_id: uuid.UUID, user_id: str, role: str, content: str, **columns: Any
) -> tuple[Insert, Update]:
    """The two statements of ``add_message``, to run in one transaction in this order: the
    insert (returning the new id), then the bump of the conversation's ``updated_at``."""
    return (
        insert(messages)
        .values(conversation_id=conversation_id, user_id=user_id, role=role, content=content, **columns)
        .returning(messages.c.id),
        update(conversations)
        .where(conversations.c.id == conversation_id, conversations.c.user_id == user_id)
        .values(updated_at=func.now()),
    )


@dataclass(frozen=True)
class Pattern:
    """A query pattern, with sample arguments, and the index expected to serve it."""

    name: str
    statement: Callable[[], Select]
    index: str
    ordered: bool  # the pattern's ORDER BY is served by the index (no Sort node expected)


_SAMPLE_USER = "user-0"
_SAMPLE_ID = uuid.UUID(int=0)
_SAMPLE_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "recent active conversations of a user",
        lambda: recent_conversations(_SAMPLE_USER),
        "idx_conversations_user_status_updated",
        ordered=True,
    ),
    Pattern(
        "history of a conversation",
        lambda: conversation_history(_SAMPLE_ID),
        "idx_messages_conversation_created",
        ordered=True,
    ),
    Pattern(
        "idle conversations, oldest first",
        lambda: idle_conversations(conversations, _SAMPLE_TIME, 500, (_SAMPLE_TIME, _SAMPLE_ID)),
        "idx_conversations_updated_id",
        ordered=True,
    ),
    Pattern(
        "idle archived conversations, oldest first",
        lambda: idle_conversations(conversations_archive, _SAMPLE_TIME, 500),
        "idx_conversations_archive_updated_id",
        ordered=True,
    ),
    *(  # purge's pages, of each hot table
        Pattern(
            f"soft-deleted {table.name} past the grace period",
            partial(soft_deleted, table, _SAMPLE_TIME, 500),
            index,
            ordered=True,
        )
        for table, index in (
            (conversations, "idx_conversations_deleted_id"),
            (messages, "idx_messages_deleted_id"),
        )
    ),
    Pattern(
        "messages of a user",
        lambda: user_messages(_SAMPLE_USER),
        "ix_messages_user_id_created_at",
        ordered=True,
    ),
)
