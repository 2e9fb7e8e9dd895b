"""After a run: the dead rows it left, and ``--vacuum`` (see docs/architecture.md,
"Archive, purge and restore")."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Engine, QueuePool, text
from sqlalchemy.exc import DBAPIError

from chatdb.defaults import needs_vacuum
from chatdb.lifecycle.models import RunResult
from chatdb.schema import conversations, conversations_archive, messages, messages_archive


def _changed(result: RunResult) -> dict[str, tuple[int, int]]:
    """The tables a run changed: {table: (rows deleted from it, rows inserted into it)}."""
    done = result.done
    if result.command == "archive":
        changed = {
            conversations.name: (done.conversations, 0),
            messages.name: (done.messages, 0),
            conversations_archive.name: (0, done.conversations),
            messages_archive.name: (0, done.messages),
        }
    else:
        changed = {
            conversations.name: (done.conversations, 0),
            messages.name: (done.messages, 0),
            conversations_archive.name: (done.archive_conversations, 0),
            messages_archive.name: (done.archive_messages, 0),
        }
    return {table: rows for table, rows in changed.items() if any(rows)}


def dead_left(engine: Engine, result: RunResult) -> dict[str, int]:
    """The tables whose rows the run deleted are enough for doctor's vacuum check to warn
    (its default thresholds), against the rows each held before (the planner's count)."""
    deleted = {table: rows for table, (rows, _) in _changed(result).items() if rows}
    if not deleted:
        return {}
    try:
        with engine.connect() as connection:
            before: dict[str, Any] = dict(
                connection.execute(
                    text(
                        "SELECT c.relname, CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint"
                        " ELSE s.n_live_tup + s.n_dead_tup END"
                        " FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid"
                        " WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:names)"
                    ),
                    {"names": list(deleted)},
                ).all()
            )
    except DBAPIError:
        return {}  # a hint only: the run itself is over and recorded
    return {
        table: rows
        for table, rows in deleted.items()
        if needs_vacuum(rows, max(int(before.get(table) or 0) - rows, 0))
    }


def vacuum(engine: Engine, result: RunResult) -> None:
    """``VACUUM (ANALYZE)`` the tables the run changed, one after the other, after its last
    batch and outside any transaction (VACUUM cannot run in one). It takes no lock that
    blocks reads or writes; never VACUUM FULL. ``result.vacuum.vacuumed`` lists the tables
    done, so a signal in the middle leaves it saying which."""
    # The run's own sessions, back in the pool, report the rows they deleted to the
    # statistics a moment after their last transaction (PostgreSQL 15 and later batch the
    # reports): made to report now, so that VACUUM's report comes after theirs, not before.
    sessions = [engine.connect() for _ in range(cast(QueuePool, engine.pool).checkedin())]
    try:
        for session in sessions:
            dbapi = session.connection.dbapi_connection
            assert dbapi is not None
            if dbapi.info.server_version >= 150000:
                session.execute(text("SELECT pg_stat_force_next_flush()"))
                session.commit()
    finally:
        for session in sessions:
            session.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        quote = connection.dialect.identifier_preparer.quote
        for table in _changed(result):
            connection.execute(text(f"VACUUM (ANALYZE) {quote(table)}"))
            result.vacuum.vacuumed.append(table)
