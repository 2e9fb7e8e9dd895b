"""The schema at head: every table, constraint and index chatdb expects.

This module is the single source of truth. The Alembic chain under ``alembic/versions``
must build exactly this (a test compares the two on the catalog), and
``verify-indexes`` reads its expectations from here.

Column order follows the migration history (columns added by later revisions come
last), because the catalog comparison includes column order.

Every index names the query pattern it serves (see ``chatdb.patterns``):

1. a user's recent active conversations
2. a conversation's history, newest first
3. retention and archive scans: ``updated_at < cutoff``, oldest first
4. soft-deleted rows past their grace period: ``deleted_at < cutoff``
5. a user's messages, and deleting a user (``messages.user_id = ?``)
6. the latest lifecycle runs (``chatdb status``), and the one-run-at-a-time guard
7. deleting a conversation: its owner foreign key's cascade, ``conversation_id = ? AND
   user_id = ?`` on messages
8. the size history since a time (``chatdb doctor``'s growth check)
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Constraint,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TextClause,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

metadata = MetaData()

#: chatdb's own Alembic version table, so it can live beside the application's.
VERSION_TABLE = "chatdb_alembic_version"
#: The revision of the chain whose schema this module declares (a test keeps the two equal).
HEAD_REVISION = "0007_keys_with_user_id"

#: The comment chatdb puts on a ``users`` table it created itself. A ``users`` table
#: without it belongs to the application and is never altered or dropped.
USERS_CREATED_BY_CHATDB = "created by chatdb"

ROLES = ("user", "assistant", "system")
STATUSES = ("active", "archived")
RUN_OUTCOMES = ("running", "succeeded", "failed", "interrupted")
USER_MESSAGE_MAX_CHARS = 1000


def _tz() -> TIMESTAMP:
    return TIMESTAMP(timezone=True)


def _now() -> TextClause:
    return text("now()")


users = Table(
    "users",
    metadata,
    Column("id", String(255), nullable=False),
    Column("email", String(255), nullable=True),
    Column("name", String(255), nullable=True),
    Column("created_at", _tz(), nullable=False, server_default=_now()),
    PrimaryKeyConstraint("id", name="users_pkey"),
    comment=USERS_CREATED_BY_CHATDB,
)


def _conversation_columns() -> list[Column]:
    return [
        Column("id", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
        Column("user_id", String(255), nullable=False),
        Column("status", String(20), nullable=False, server_default=text("'active'")),
        Column("created_at", _tz(), nullable=False, server_default=_now()),
        # Last activity: bumped in the same transaction that adds a message.
        Column("updated_at", _tz(), nullable=False, server_default=_now()),
        Column("title", String(200), nullable=True),
        Column("metadata", JSONB, nullable=True),
        # Soft delete, set by the application; purge removes the row after a grace period.
        Column("deleted_at", _tz(), nullable=True),
    ]


def _message_columns() -> list[Column]:
    return [
        Column("id", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
        Column("conversation_id", UUID(as_uuid=True), nullable=False),
        Column("user_id", String(255), nullable=False),
        Column("role", String(20), nullable=False),
        Column("content", Text, nullable=False),
        Column("metadata", JSONB, nullable=True),
        Column("created_at", _tz(), nullable=False, server_default=_now()),
        Column("tool_calls", JSONB, nullable=True),
        Column("tool_results", JSONB, nullable=True),
        Column("deleted_at", _tz(), nullable=True),
    ]


def _added_message_columns() -> list[Column]:
    """The columns later revisions add to ``messages`` and ``messages_archive`` alike, in
    the order they were added. A revision adds a column at the end of each table, after
    the archive's ``archived_at``: this is where it is declared, so that ``create_all()``
    builds the tables the migrations build. None yet."""
    return []


_STATUS_CHECK = "status IN ('active', 'archived')"
_ROLE_CHECK = "role IN ('user', 'assistant', 'system')"
# length() of text counts characters, not bytes.
_LENGTH_CHECK = "role != 'user' OR length(content) <= 1000"


def _archived(archive: bool) -> list[Column]:
    """The column an archive table adds to its hot table's."""
    return [Column("archived_at", _tz(), nullable=False, server_default=_now())] if archive else []


def _conversations_table(name: str, *, archive: bool, status_check: str) -> Table:
    """``conversations`` and its archive: the same columns, keys and checks."""
    return Table(
        name,
        metadata,
        *_conversation_columns(),
        *_archived(archive),
        # Holds user_id, the distribution column on Citus, which requires every key of a
        # distributed table to hold it; id first, so a lookup by id is one probe. Also the
        # target of the messages' (conversation_id, user_id) foreign key: the database
        # refuses a message whose user is not the owner of its conversation.
        PrimaryKeyConstraint("id", "user_id", name=f"{name}_pkey"),
        ForeignKeyConstraint(["user_id"], ["users.id"], name=f"{name}_user_id_fkey", ondelete="CASCADE"),
        CheckConstraint(_STATUS_CHECK, name=status_check),
    )


def _messages_table(
    name: str, conversations: str, *, archive: bool, role_check: str, length_check: str
) -> Table:
    """``messages`` and its archive: the same columns and checks; each message belongs to
    a conversation of its own user (in ``conversations``). Archived messages reference
    no user directly: deleting a user reaches them through conversations_archive."""
    users_key = ForeignKeyConstraint(
        ["user_id"], ["users.id"], name=f"{name}_user_id_fkey", ondelete="CASCADE"
    )
    return Table(
        name,
        metadata,
        *_message_columns(),
        *_archived(archive),
        *_added_message_columns(),
        PrimaryKeyConstraint("id", "user_id", name=f"{name}_pkey"),
        *([] if archive else [users_key]),
        ForeignKeyConstraint(
            ["conversation_id", "user_id"],
            [f"{conversations}.id", f"{conversations}.user_id"],
            name=f"fk_{name}_conversation_owner",
            ondelete="CASCADE",
        ),
        CheckConstraint(_ROLE_CHECK, name=role_check),
        CheckConstraint(_LENGTH_CHECK, name=length_check),
    )


def _by_last_activity(table: Table) -> Index:
    """Pattern 3: keyset scans in (updated_at, id) order, oldest first."""
    return Index(f"idx_{table.name}_updated_id", table.c.updated_at, table.c.id)


def _soft_deleted(table: Table) -> Index:
    """Pattern 4: few rows are soft-deleted, so the partial index stays small."""
    return Index(
        f"idx_{table.name}_deleted_id",
        table.c.deleted_at,
        table.c.id,
        postgresql_where=text("deleted_at IS NOT NULL"),
    )


def _history(table: Table) -> Index:
    """Pattern 2, newest first (as seeds 000/001 declare it); also covers the foreign key
    to the conversations."""
    return Index(f"idx_{table.name}_conversation_created", table.c.conversation_id, table.c.created_at.desc())


conversations = _conversations_table(
    "conversations",
    archive=False,
    status_check="chk_conversation_status",
)

# Pattern 1; its leading user_id also covers the foreign key to users.
Index(
    "idx_conversations_user_status_updated",
    conversations.c.user_id,
    conversations.c.status,
    conversations.c.updated_at.desc(),
)
_by_last_activity(conversations)
_soft_deleted(conversations)


messages = _messages_table(
    "messages",
    "conversations",
    archive=False,
    role_check="chk_message_role",
    length_check="chk_user_message_length",
)

_history(messages)
# Pattern 7: the cascade of the owner foreign key when a conversation is deleted
# (``conversation_id = $1 AND user_id = $2``, a generic plan), one probe per
# conversation; without it PostgreSQL ANDs the two indexes around it and reads all of
# the owner's messages for every conversation deleted.
Index("idx_messages_conversation_owner", messages.c.conversation_id, messages.c.user_id)
# Pattern 5; also covers the foreign key to users (seed 003's name and definition).
Index("ix_messages_user_id_created_at", messages.c.user_id, messages.c.created_at)
_soft_deleted(messages)


class SeededColumn(NamedTuple):
    """A column of ``messages`` that ``chatdb seed`` fills, and how."""

    name: str
    #: The binary COPY encoding of its values: uuid, text (any string type), jsonb,
    #: timestamptz, int2, int4, int8 or bool (``chatdb.seed.copy_encoder.ENCODERS``).
    encoding: str
    #: Which of the seed's per-message values goes there, when not the one named like
    #: the column (``chatdb.seed.rows.MESSAGE_VALUES`` lists them).
    value: str | None = None


#: What ``chatdb seed`` writes into ``messages``, in COPY order. The seed's COPY column
#: list, field count and row layout all come from this tuple alone; a column left out
#: gets its server default (NULL for a nullable column without one).
SEEDED_MESSAGE_COLUMNS: tuple[SeededColumn, ...] = (
    SeededColumn("id", "uuid"),
    SeededColumn("conversation_id", "uuid"),
    SeededColumn("user_id", "text"),
    SeededColumn("role", "text"),
    SeededColumn("content", "text"),
    SeededColumn("metadata", "jsonb"),
    SeededColumn("created_at", "timestamptz"),
    SeededColumn("tool_calls", "jsonb"),
    SeededColumn("tool_results", "jsonb"),
    SeededColumn("deleted_at", "timestamptz"),
)


conversations_archive = _conversations_table(
    "conversations_archive",
    archive=True,
    status_check="chk_conversations_archive_status",
)

# Restoring a user's archive, and deleting a user; covers the foreign key to users.
Index("idx_conversations_archive_user_id", conversations_archive.c.user_id)
# Purge ages archived conversations by updated_at too.
_by_last_activity(conversations_archive)
_soft_deleted(conversations_archive)


messages_archive = _messages_table(
    "messages_archive",
    "conversations_archive",
    archive=True,
    role_check="chk_messages_archive_role",
    length_check="chk_messages_archive_user_message_length",
)

# Export and restore read a conversation's messages.
_history(messages_archive)
_soft_deleted(messages_archive)


chatdb_runs = Table(
    "chatdb_runs",
    metadata,
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("command", String(40), nullable=False),
    Column("arguments", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("cutoff", _tz(), nullable=True),
    Column("db_user", String(255), nullable=False, server_default=text("CURRENT_USER")),
    Column("client_host", String(255), nullable=True),
    Column("client_pid", Integer, nullable=True),
    Column("started_at", _tz(), nullable=False, server_default=_now()),
    # Renewed every batch. A run is taken over only once its guard lock is free; a
    # heartbeat older than a minute only marks it "(stalled?)" when another run is refused.
    Column("heartbeat_at", _tz(), nullable=False, server_default=_now()),
    Column("finished_at", _tz(), nullable=True),
    Column("outcome", String(20), nullable=False, server_default=text("'running'")),
    Column("counts", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("error", Text, nullable=True),
    PrimaryKeyConstraint("id", name="chatdb_runs_pkey"),
    CheckConstraint(
        "outcome IN ('running', 'succeeded', 'failed', 'interrupted')",
        name="chk_chatdb_runs_outcome",
    ),
)

# Pattern 6: the latest runs, newest first.
Index("idx_chatdb_runs_started_at", chatdb_runs.c.started_at.desc())
# Pattern 6: at most one lifecycle run in progress per database.
Index(
    "uq_chatdb_runs_one_running",
    text("(true)"),
    unique=True,
    postgresql_where=text("outcome = 'running'"),
    _table=chatdb_runs,
)

chatdb_size_history = Table(
    "chatdb_size_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("recorded_at", _tz(), nullable=False, server_default=_now()),
    # The command that recorded the sample: "status" or "doctor".
    Column("command", Text, nullable=False),
    # The table measured; NULL for the whole database (pg_database_size).
    Column("table_name", Text, nullable=True),
    # The statistics' live rows (no count): NULL for the whole database.
    Column("row_estimate", BigInteger, nullable=True),
    # Table, TOAST and indexes.
    Column("total_bytes", BigInteger, nullable=False),
    PrimaryKeyConstraint("id", name="chatdb_size_history_pkey"),
)

# Pattern 8: the samples since a time, for every table at once.
Index("idx_chatdb_size_history_recorded_at", chatdb_size_history.c.recorded_at)

#: On Citus, the column the application's tables are distributed by, and those tables,
#: co-located, parents first: every conversation's rows, hot and archived, live on one
#: node, and each query with an equality on user_id goes to that node alone. ``users`` is
#: a reference table (a copy on every node); chatdb's own small tables stay on the
#: coordinator (docs/architecture.md, "Running on Citus").
DISTRIBUTION_COLUMN = "user_id"
DISTRIBUTED_TABLES: tuple[Table, ...] = (conversations, messages, conversations_archive, messages_archive)
REFERENCE_TABLES: tuple[Table, ...] = (users,)
#: On Citus, the coordinator's tables that a lifecycle batch writes (its audit row): Citus
#: local tables (in its metadata, still on the coordinator alone), so that a batch's
#: write on a worker and its audit row commit together, in two phases.
CITUS_LOCAL_TABLES: tuple[Table, ...] = (chatdb_runs,)

#: The tables chatdb owns, in dependency order (parents first). ``users`` is not among
#: them: it belongs to the application unless chatdb created it.
CHATDB_TABLES: tuple[Table, ...] = (
    conversations,
    messages,
    conversations_archive,
    messages_archive,
    chatdb_runs,
    chatdb_size_history,
)


def add_constraint_sql(constraint: Constraint) -> str:
    """``ALTER TABLE … ADD …`` for one of this module's constraints, in PostgreSQL's SQL.

    Rendered by the dialect's DDL compiler rather than executed as ``AddConstraint``,
    which marks the constraint as not to be rendered inline: every later ``create_all``
    of the process would then leave it out of its table.
    """
    dialect = postgresql.dialect()
    compiler = dialect.ddl_compiler(dialect, None)  # type: ignore[arg-type]  # for process() alone
    table = constraint.table
    assert isinstance(table, Table)
    quote = dialect.identifier_preparer.quote
    return f"ALTER TABLE {quote(table.name)} ADD {compiler.process(constraint)}"
