"""conversations, and a minimal users table when there is none

The conversations table of seed 001 (task 2), index names included.

Revision ID: 0001_conversations
Revises:
Create Date: 2026-02-09

``users`` belongs to the application. On a database that has none, a minimal one is
created (and marked with a table comment) so the foreign keys resolve; a ``users`` table
without that comment is never altered or dropped.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from alembic import op

revision = "0001_conversations"
down_revision = None


def upgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regclass('users') IS NULL THEN
                CREATE TABLE users (
                    id varchar(255) NOT NULL,
                    email varchar(255),
                    name varchar(255),
                    created_at timestamptz NOT NULL DEFAULT now(),
                    CONSTRAINT users_pkey PRIMARY KEY (id)
                );
                COMMENT ON TABLE users IS 'created by chatdb';
            END IF;
        END
        $$
        """
    )
    op.create_table(
        "conversations",
        sa.Column("id", UUID(as_uuid=True), server_default=sa.text("gen_random_uuid()")),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, server_default=sa.text("'active'")),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("id", name="conversations_pkey"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="conversations_user_id_fkey", ondelete="CASCADE"
        ),
        sa.CheckConstraint("status IN ('active', 'archived')", name="chk_conversation_status"),
    )
    # A new, empty table: plain CREATE INDEX.
    op.create_index("idx_conversations_user_id", "conversations", ["user_id"])
    op.create_index("idx_conversations_updated_at", "conversations", [sa.text("updated_at DESC")])
    op.create_index("idx_conversations_user_status", "conversations", ["user_id", "status"])


def downgrade() -> None:
    op.drop_table("conversations")
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regclass('users') IS NOT NULL
               AND obj_description(to_regclass('users'), 'pg_class') = 'created by chatdb' THEN
                DROP TABLE users;
            END IF;
        END
        $$
        """
    )
