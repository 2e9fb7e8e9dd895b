"""Alembic environment for chatdb's own migration chain.

chatdb keeps its own version table (``chatdb_alembic_version``) so that it lives beside
the application's Alembic history in the same database. ``chatdb migrate`` passes an
open connection; a plain ``alembic upgrade head`` in a checkout resolves the database
the way chatdb does.
"""

from __future__ import annotations

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
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url="postgresql+psycopg://", literal_binds=True, dialect_name="postgresql")
    context.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    external_transaction = connection.in_transaction()
    if not external_transaction:
        # A session setting, committed before Alembic starts its own transactions, so it
        # also covers the statements that run outside a transaction (CONCURRENTLY).
        connection.exec_driver_sql("SELECT set_config('lock_timeout', %s, false)", (LOCK_TIMEOUT,))
        connection.commit()
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
    if not external_transaction:
        connection.exec_driver_sql("RESET lock_timeout")
        connection.commit()


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
