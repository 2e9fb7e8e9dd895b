"""chatbot extensions, the owner guard, and indexes from the query patterns

Titles, metadata, soft delete, tool calls and results, the system role; the database
refuses a message whose user is not its conversation's owner.

Revision ID: 0003_chatbot_extensions
Revises: 0002_messages
Create Date: 2026-02-16

The tables may already hold the application's data, so: new columns are nullable
(no rewrite), constraints are added NOT VALID and validated in their own transaction,
indexes are built and dropped CONCURRENTLY. Each step is idempotent, because the
concurrent steps commit as they go. A transaction that changes both tables first locks
them both (``migration_ops.lock_tables``), so that the application never waits on one
while the migration waits for the other.

Indexes, from the query patterns (chatdb.schema says which serves which):
- ``idx_conversations_user_status_updated`` (user_id, status, updated_at DESC) replaces
  ``idx_conversations_user_status`` and ``idx_conversations_user_id``, its left prefixes;
- ``idx_conversations_updated_id`` (updated_at, id) replaces ``idx_conversations_updated_at``
  for keyset retention scans;
- ``idx_messages_conversation_id`` is a left prefix of ``idx_messages_conversation_created``;
  ``idx_messages_created_at`` serves no query;
- ``ix_messages_user_id_created_at`` (seed 003) serves a user's messages and covers the
  foreign key to users; the partial ``*_deleted_id`` indexes serve the grace-period purge.
"""

from __future__ import annotations

from alembic import op
from chatdb import migration_ops as ops

revision = "0003_chatbot_extensions"
down_revision = "0002_messages"


def upgrade() -> None:
    # Each subcommand in an ALTER TABLE of its own: Citus refuses several in one (on a
    # cluster whose users is a reference table, these tables are already in its metadata).
    ops.lock_tables("conversations", "messages")
    for table, column, type_ in (
        ("conversations", "title", "varchar(200)"),
        ("conversations", "metadata", "jsonb"),
        ("conversations", "deleted_at", "timestamptz"),
        ("messages", "tool_calls", "jsonb"),
        ("messages", "tool_results", "jsonb"),
        ("messages", "deleted_at", "timestamptz"),
    ):
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {type_}")
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS chk_message_role")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT chk_message_role"
        " CHECK (role IN ('user', 'assistant', 'system')) NOT VALID"
    )
    ops.validate_constraint("messages", "chk_message_role")

    # The database refuses a message whose user is not its conversation's owner.
    ops.create_index("uq_conversations_id_user", "conversations", "(id, user_id)", unique=True)
    ops.lock_tables("conversations", "messages")
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (
                SELECT 1 FROM pg_constraint
                WHERE conname = 'uq_conversations_id_user'
                  AND conrelid = 'conversations'::regclass
            ) THEN
                ALTER TABLE conversations
                    ADD CONSTRAINT uq_conversations_id_user UNIQUE USING INDEX uq_conversations_id_user;
            END IF;
        END
        $$
        """
    )
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS fk_messages_conversation_owner")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT fk_messages_conversation_owner FOREIGN KEY"
        " (conversation_id, user_id) REFERENCES conversations (id, user_id) ON DELETE CASCADE NOT VALID"
    )
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_conversation_id_fkey")
    ops.validate_constraint("messages", "fk_messages_conversation_owner")

    ops.create_index(
        "idx_conversations_user_status_updated",
        "conversations",
        "(user_id, status, updated_at DESC)",
    )
    ops.create_index("idx_conversations_updated_id", "conversations", "(updated_at, id)")
    ops.create_index(
        "idx_conversations_deleted_id",
        "conversations",
        "(deleted_at, id)",
        where="deleted_at IS NOT NULL",
    )
    ops.create_index("ix_messages_user_id_created_at", "messages", "(user_id, created_at)")
    ops.create_index(
        "idx_messages_deleted_id", "messages", "(deleted_at, id)", where="deleted_at IS NOT NULL"
    )
    for name in (
        "idx_conversations_user_status",
        "idx_conversations_user_id",
        "idx_conversations_updated_at",
        "idx_messages_conversation_id",
        "idx_messages_created_at",
    ):
        ops.drop_index(name)


#: Why this revision cannot be undone now (no row when it can): the older schema has no
#: place for these rows. ``chatdb migrate down`` asks it before undoing any revision.
DOWNGRADE_REFUSAL = (
    "SELECT 'messages with role ''system'' exist' WHERE EXISTS (SELECT FROM messages WHERE role = 'system')"
)


def downgrade() -> None:
    # Refuse before changing anything (also under a plain `alembic downgrade`).
    ops.refuse_downgrade(revision, DOWNGRADE_REFUSAL)
    ops.create_index("idx_conversations_user_id", "conversations", "(user_id)")
    ops.create_index("idx_conversations_updated_at", "conversations", "(updated_at DESC)")
    ops.create_index("idx_conversations_user_status", "conversations", "(user_id, status)")
    ops.create_index("idx_messages_conversation_id", "messages", "(conversation_id)")
    ops.create_index("idx_messages_created_at", "messages", "(created_at DESC)")

    ops.lock_tables("conversations", "messages")
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_conversation_id_fkey")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_conversation_id_fkey FOREIGN KEY (conversation_id)"
        " REFERENCES conversations (id) ON DELETE CASCADE NOT VALID"
    )
    ops.validate_constraint("messages", "messages_conversation_id_fkey")
    ops.lock_tables("conversations", "messages")
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS fk_messages_conversation_owner")
    op.execute("ALTER TABLE conversations DROP CONSTRAINT IF EXISTS uq_conversations_id_user")
    op.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS chk_message_role")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT chk_message_role CHECK (role IN ('user', 'assistant')) NOT VALID"
    )
    ops.validate_constraint("messages", "chk_message_role")

    for name in (
        "idx_conversations_user_status_updated",
        "idx_conversations_updated_id",
        "idx_conversations_deleted_id",
        "ix_messages_user_id_created_at",
        "idx_messages_deleted_id",
    ):
        ops.drop_index(name)
    ops.lock_tables("conversations", "messages")
    for table, column in (
        ("conversations", "title"),
        ("conversations", "metadata"),
        ("conversations", "deleted_at"),
        ("messages", "tool_calls"),
        ("messages", "tool_results"),
        ("messages", "deleted_at"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {column}")
