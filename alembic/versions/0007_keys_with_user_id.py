"""primary keys that hold user_id, so the tables can be distributed by it

On Citus, conversations, messages and their archive tables are distributed by
``user_id`` (docs/architecture.md, "Running on Citus"), and Citus requires every primary
key and unique constraint of a distributed table to include the distribution column. The
primary keys become ``(id, user_id)``: ``id`` first, so a lookup by id alone is still one
index probe on plain PostgreSQL. The conversations' key then covers what
``uq_conversations_id_user`` enforced, and the owner foreign key of the messages moves to
it; the same on the archive tables.

Revision ID: 0007_keys_with_user_id
Revises: 0006_size_history
Create Date: 2026-12-08

The tables hold the application's data. Each new key's index is built CONCURRENTLY; the
swap itself (drop the old key, add the new one USING the index, put the owner foreign key
back NOT VALID) is one short transaction under the migration's lock_timeout, and the
foreign key is validated afterwards in a statement of its own, which blocks no writes.
Each step is idempotent (chatdb.migration_ops.replace_primary_key).
"""

from __future__ import annotations

from chatdb import migration_ops as ops

revision = "0007_keys_with_user_id"
down_revision = "0006_size_history"

_OWNER = "FOREIGN KEY (conversation_id, user_id) REFERENCES {parent} (id, user_id) ON DELETE CASCADE"
#: Each conversations table with its messages table, hot then archive.
_TABLES = (("conversations", "messages"), ("conversations_archive", "messages_archive"))


def _owner(child: str, parent: str) -> tuple[str, str, str]:
    return (child, f"fk_{child}_conversation_owner", _OWNER.format(parent=parent))


def upgrade() -> None:
    for parent, child in _TABLES:
        ops.replace_primary_key(
            parent,
            ("id", "user_id"),
            dependents=(_owner(child, parent),),
            drop_unique=f"uq_{parent}_id_user",
        )
        ops.replace_primary_key(child, ("id", "user_id"))


#: The keys of 0006 make each id unique by itself, which these keys do not ask: two
#: users' rows may share an id (a client that chose it, an import). A downgrade then
#: refuses before it changes anything, rather than fail half-way.
DOWNGRADE_REFUSAL = (
    "SELECT 'rows of two users share an id in ' || string_agg(name, ', ') FROM (VALUES "
    + ", ".join(
        f"('{table}', EXISTS (SELECT FROM {table} GROUP BY id HAVING count(*) > 1))"
        for pair in _TABLES
        for table in pair
    )
    + ") AS t(name, shared) WHERE shared"
)


def downgrade() -> None:
    # Refuse before changing anything (also under a plain `alembic downgrade`).
    ops.refuse_downgrade(revision, DOWNGRADE_REFUSAL)
    for parent, child in reversed(_TABLES):
        ops.replace_primary_key(child, ("id",))
        ops.replace_primary_key(
            parent,
            ("id",),
            dependents=(_owner(child, parent),),
            add_unique=(f"uq_{parent}_id_user", ("id", "user_id")),
        )
