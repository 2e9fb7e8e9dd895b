"""the size history of chatdb's tables

For `chatdb doctor`'s growth check: every `chatdb status` and `chatdb doctor` run
records, for each of chatdb's tables (and ``users``), its on-disk size and row estimate,
and the size of the whole database; the growth per day and per week, and the date a size
limit will be reached, come from these rows.

Revision ID: 0006_size_history
Revises: 0005_messages_owner_index
Create Date: 2026-12-01

A new table: created empty in one short transaction, under the migration's lock_timeout
and statement_timeout, with its index; the downgrade drops it.
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0006_size_history"
down_revision = "0005_messages_owner_index"


def upgrade() -> None:
    op.create_table(
        "chatdb_size_history",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True)),
        sa.Column(
            "recorded_at", sa.TIMESTAMP(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("table_name", sa.Text),
        sa.Column("row_estimate", sa.BigInteger),
        sa.Column("total_bytes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="chatdb_size_history_pkey"),
    )
    op.create_index("idx_chatdb_size_history_recorded_at", "chatdb_size_history", ["recorded_at"])


def downgrade() -> None:
    op.drop_table("chatdb_size_history")
