"""Alembic environment for chatdb's own migration chain.

chatdb keeps its own version table (``chatdb_alembic_version``) so that it lives beside
the application's Alembic history in the same database. ``chatdb migrate`` passes an
open connection in ``config.attributes["connection"]``; an Engine there works too (as
pytest-alembic passes one); a plain ``alembic upgrade head`` in a checkout resolves the
database the way chatdb does.
"""

from __future__ import annotations

from sqlalchemy import Engine, event

from alembic import context
from chatdb.schema import VERSION_TABLE, metadata

config = context.config

#: A busy table makes a migration fail fast instead of queueing the application's
#: queries behind the migration's lock request.
LOCK_TIMEOUT = config.attributes.get("lock_timeout", "5s")
#: No statement in a migration's transaction, where it may hold locks the application
#: waits for, runs longer than this. Their DDL only changes the catalog, which takes
#: milliseconds; what runs long by nature (CREATE INDEX CONCURRENTLY, VALIDATE
#: CONSTRAINT, a downgrade's refusal query) runs outside one or is exempted, and blocks
#: no one (chatdb.migration_ops).
STATEMENT_TIMEOUT = config.attributes.get("statement_timeout", "30s")
for _name, _value in (("lock_timeout", LOCK_TIMEOUT), ("statement_timeout", STATEMENT_TIMEOUT)):
    if not all(part.isalnum() for part in _value.split()):
        raise ValueError(f"invalid {_name} {_value!r}")


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
        chatdb_concurrently=config.attributes.get("concurrently", True),
        # For the statements that run outside a transaction (chatdb.migration_ops).
        chatdb_lock_timeout=LOCK_TIMEOUT,
        chatdb_statement_timeout=STATEMENT_TIMEOUT,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url="postgresql+psycopg://", literal_binds=True, dialect_name="postgresql")
    # psql runs the script in a session of its own (the direct endpoint, as the README
    # says), so session settings are safe here.
    context.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    context.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    with context.begin_transaction():
        context.run_migrations()


def _set_timeouts(connection) -> None:
    # Local to each transaction Alembic begins: no session state, which a transaction
    # pooler would carry over to other clients' transactions. (In AUTOCOMMIT they last
    # one statement; those steps are watched by chatdb.migration_ops instead.)
    connection.exec_driver_sql(
        "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
        (LOCK_TIMEOUT, STATEMENT_TIMEOUT),
    )


def _run(connection) -> None:
    if connection.in_transaction():
        _set_timeouts(connection)
    event.listen(connection, "begin", _set_timeouts)
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        event.remove(connection, "begin", _set_timeouts)


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if isinstance(connectable, Engine):
        with connectable.connect() as connection:
            _run(connection)
        return
    if connectable is not None:
        _run(connectable)
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
