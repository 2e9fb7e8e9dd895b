"""archive tables and the audit table of lifecycle runs

Cold storage for `chatdb archive`, and one row per archive or purge run.

Revision ID: 0004_archive_and_audit
Revises: 0003_chatbot_extensions
Create Date: 2026-02-23
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from alembic import op

revision = "0004_archive_and_audit"
down_revision = "0003_chatbot_extensions"

_NOW = sa.text("now()")


def _tz():
    return sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations_archive",
        sa.Column("id", UUID(as_uuid=True), server_default=sa.text("gen_random_uuid()")),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default=sa.text("'active'")),
        sa.Column("created_at", _tz(), nullable=False, server_default=_NOW),
        sa.Column("updated_at", _tz(), nullable=False, server_default=_NOW),
        sa.Column("title", sa.String(200)),
        sa.Column("metadata", JSONB),
        sa.Column("deleted_at", _tz()),
        sa.Column("archived_at", _tz(), nullable=False, server_default=_NOW),
        sa.PrimaryKeyConstraint("id", name="conversations_archive_pkey"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="conversations_archive_user_id_fkey", ondelete="CASCADE"
        ),
        sa.CheckConstraint("status IN ('active', 'archived')", name="chk_conversations_archive_status"),
        sa.UniqueConstraint("id", "user_id", name="uq_conversations_archive_id_user"),
    )
    op.create_index("idx_conversations_archive_user_id", "conversations_archive", ["user_id"])
    op.create_index("idx_conversations_archive_updated_id", "conversations_archive", ["updated_at", "id"])
    op.create_index(
        "idx_conversations_archive_deleted_id",
        "conversations_archive",
        ["deleted_at", "id"],
        postgresql_where=sa.text("deleted_at IS NOT NULL"),
    )

    op.create_table(
        "messages_archive",
        sa.Column("id", UUID(as_uuid=True), server_default=sa.text("gen_random_uuid()")),
        sa.Column("conversation_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("metadata", JSONB),
        sa.Column("created_at", _tz(), nullable=False, server_default=_NOW),
        sa.Column("tool_calls", JSONB),
        sa.Column("tool_results", JSONB),
        sa.Column("deleted_at", _tz()),
        sa.Column("archived_at", _tz(), nullable=False, server_default=_NOW),
        sa.PrimaryKeyConstraint("id", name="messages_archive_pkey"),
        sa.ForeignKeyConstraint(
            ["conversation_id", "user_id"],
            ["conversations_archive.id", "conversations_archive.user_id"],
            name="fk_messages_archive_conversation_owner",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("role IN ('user', 'assistant', 'system')", name="chk_messages_archive_role"),
        sa.CheckConstraint(
            "role != 'user' OR length(content) <= 1000",
            name="chk_messages_archive_user_message_length",
        ),
    )
    op.create_index(
        "idx_messages_archive_conversation_created",
        "messages_archive",
        ["conversation_id", sa.text("created_at DESC")],
    )
    op.create_index(
        "idx_messages_archive_deleted_id",
        "messages_archive",
        ["deleted_at", "id"],
        postgresql_where=sa.text("deleted_at IS NOT NULL"),
    )

    op.create_table(
        "chatdb_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column("command", sa.String(40), nullable=False),
        sa.Column("arguments", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("cutoff", _tz()),
        sa.Column("db_user", sa.String(255), nullable=False, server_default=sa.text("CURRENT_USER")),
        sa.Column("client_host", sa.String(255)),
        sa.Column("client_pid", sa.Integer),
        sa.Column("started_at", _tz(), nullable=False, server_default=_NOW),
        sa.Column("heartbeat_at", _tz(), nullable=False, server_default=_NOW),
        sa.Column("finished_at", _tz()),
        sa.Column("outcome", sa.String(20), nullable=False, server_default=sa.text("'running'")),
        sa.Column("counts", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="chatdb_runs_pkey"),
        sa.CheckConstraint(
            "outcome IN ('running', 'succeeded', 'failed', 'interrupted')",
            name="chk_chatdb_runs_outcome",
        ),
    )
    op.create_index("idx_chatdb_runs_started_at", "chatdb_runs", [sa.text("started_at DESC")])
    op.execute(
        "CREATE UNIQUE INDEX uq_chatdb_runs_one_running ON chatdb_runs ((true)) WHERE outcome = 'running'"
    )


def downgrade() -> None:
    op.drop_table("chatdb_runs")
    op.drop_table("messages_archive")
    op.drop_table("conversations_archive")
