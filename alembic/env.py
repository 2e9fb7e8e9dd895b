"""Alembic environment for chatdb's own migration chain.

chatdb keeps its own version table (``chatdb_alembic_version``) so that it lives beside
the application's Alembic history in the same database. ``chatdb migrate`` passes an
open connection; a plain ``alembic upgrade head`` in a checkout resolves the database
the way chatdb does.
"""

from __future__ import annotations

from sqlalchemy import event

from alembic import context
from chatdb.schema import VERSION_TABLE, metadata

config = context.config

#: A busy table makes a migration fail fast instead of queueing the application's
#: queries behind the migration's lock request.
LOCK_TIMEOUT = config.attributes.get("lock_timeout", "5s")
if not all(part.isalnum() for part in LOCK_TIMEOUT.split()):
    raise ValueError(f"invalid lock_timeout {LOCK_TIMEOUT!r}")


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
        chatdb_concurrently=config.attributes.get("concurrently", True),
        # For the statements that run outside a transaction (chatdb.migration_ops).
        chatdb_lock_timeout=LOCK_TIMEOUT,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url="postgresql+psycopg://", literal_binds=True, dialect_name="postgresql")
    context.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    with context.begin_transaction():
        context.run_migrations()


def _set_lock_timeout(connection) -> None:
    # Local to each transaction Alembic begins: no session state, which a transaction
    # pooler would carry over to other clients' transactions. (In AUTOCOMMIT it lasts one
    # statement; those steps are watched by chatdb.migration_ops instead.)
    connection.exec_driver_sql("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))


def _run(connection) -> None:
    if connection.in_transaction():
        _set_lock_timeout(connection)
    event.listen(connection, "begin", _set_lock_timeout)
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        event.remove(connection, "begin", _set_lock_timeout)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from chatdb import db

    engine = db.connect(db.resolve_database(None), application_name="chatdb alembic")
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
