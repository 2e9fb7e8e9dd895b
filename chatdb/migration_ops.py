"""Operations the migration scripts share.

Revisions that touch tables which may already hold data build indexes
``CONCURRENTLY`` and validate constraints in their own short transactions. Those steps
commit as they go, so each is idempotent: a revision interrupted half-way is simply run
again.

When chatdb builds a revision's schema in a scratch schema inside a transaction that is
rolled back (``migrate stamp``, ``migrate down``), concurrent builds are impossible and
unnecessary; the migration context option ``chatdb_concurrently=False`` turns them into
plain statements.
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op


def _concurrently() -> bool:
    return bool(op.get_context().opts.get("chatdb_concurrently", True))


def create_index(
    name: str, table: str, columns: str, *, unique: bool = False, where: str | None = None
) -> None:
    """Create an index, CONCURRENTLY unless in a scratch build. An index left invalid by
    an earlier failed concurrent build is dropped and built again."""
    kind = "UNIQUE INDEX" if unique else "INDEX"
    predicate = f" WHERE {where}" if where else ""
    if not _concurrently():
        op.execute(f"CREATE {kind} {name} ON {table} {columns}{predicate}")
        return
    context = op.get_context()
    with context.autocommit_block():
        if not context.as_sql:
            valid = (
                op.get_bind()
                .execute(
                    text(
                        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                        " WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
                    ),
                    {"name": name},
                )
                .scalar()
            )
            if valid:
                return
            if valid is not None:
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        op.execute(f"CREATE {kind} CONCURRENTLY {name} ON {table} {columns}{predicate}")


def drop_index(name: str) -> None:
    """Drop an index if it exists, CONCURRENTLY unless in a scratch build."""
    if not _concurrently():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        return
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def validate_constraint(table: str, name: str) -> None:
    """Validate a constraint added NOT VALID, in its own transaction, so the scan holds
    only a SHARE UPDATE EXCLUSIVE lock (writes go on) and the ALTER that added it did not
    hold its stronger lock for the length of the scan."""
    statement = f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}"
    if not _concurrently():
        op.execute(statement)
        return
    with op.get_context().autocommit_block():
        op.execute(statement)
