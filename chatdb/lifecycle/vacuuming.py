"""After a run: the dead rows it left, and ``--vacuum`` (see docs/architecture.md,
"Archive, purge and restore")."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, Engine, QueuePool, text
from sqlalchemy.exc import DBAPIError

from chatdb.defaults import needs_vacuum
from chatdb.lifecycle.models import RunResult, Vacuum
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


def may_vacuum(version: int) -> str:
    """SQL, true when the current role may VACUUM or ANALYZE the table ``c`` (pg_class) by
    PostgreSQL's own rule (vacuum.c) for a server of ``version`` (server_version_num): up
    to 16, its owner or a member of the owning role (a superuser is one of every role);
    from 17, a role with MAINTAIN on it (its owner, a member of the owner, a superuser, a
    member of pg_maintain, or a role it was granted to); and, on every version, the
    database's owner (or a member of that role). PostgreSQL skips any other table with a
    WARNING and no error."""
    table = (
        "has_table_privilege(c.oid, 'MAINTAIN')" if version >= 170000 else "pg_has_role(c.relowner, 'USAGE')"
    )
    owner = "(SELECT d.datdba FROM pg_database d WHERE d.datname = current_database())"
    return f"({table} OR (NOT c.relisshared AND pg_has_role({owner}, 'USAGE')))"


def run_by(owner: str, version: int) -> str:
    """Who may VACUUM a table owned by ``owner`` (that this role may not), for a fix."""
    return f"{owner} (the owner)" + (" or a role with MAINTAIN on the table" if version >= 170000 else "")


def _server_version(connection: Connection) -> int:
    return int(connection.execute(text("SELECT current_setting('server_version_num')")).scalar_one())


def _not_permitted(connection: Connection, tables: list[str]) -> dict[str, tuple[str, str]]:
    """Of ``tables`` (in the current schema), those the current role may not vacuum:
    {table: (why, who may)}."""
    if not tables:
        return {}
    version = _server_version(connection)
    rows = connection.execute(
        text(
            "SELECT c.relname, pg_get_userbyid(c.relowner), current_user FROM pg_class c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:names)"
            f" AND NOT {may_vacuum(version)}"
        ),
        {"names": tables},
    ).all()
    maintain = ", or a role with MAINTAIN on the table" if version >= 170000 else ""
    return {
        table: (
            f"{role} may not vacuum a table owned by {owner} (only {owner} or a member of it,"
            f" the database's owner{',' if maintain else ' or'} a superuser{maintain} may)",
            run_by(owner, version),
        )
        for table, owner, role in rows
    }


def dead_left(engine: Engine, result: RunResult) -> Vacuum:
    """The tables whose rows the run deleted are enough for doctor's vacuum check to warn
    (its default thresholds), against the rows each held before (the planner's count), and
    who may vacuum those the role that ran it may not."""
    deleted = {table: rows for table, (rows, _) in _changed(result).items() if rows}
    if not deleted:
        return Vacuum()
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
            needed = {
                table: rows
                for table, rows in deleted.items()
                if needs_vacuum(rows, max(int(before.get(table) or 0) - rows, 0))
            }
            denied = _not_permitted(connection, list(needed))
    except DBAPIError:
        return Vacuum()  # a hint only: the run itself is over and recorded
    return Vacuum(needed=needed, run_by={table: who for table, (_, who) in denied.items()})


def vacuum(engine: Engine, result: RunResult) -> None:
    """``VACUUM (ANALYZE)`` the tables the run changed, one after the other, after its last
    batch and outside any transaction (VACUUM cannot run in one). It takes no lock that
    blocks reads or writes; never VACUUM FULL. ``result.vacuum.vacuumed`` lists the tables
    done, so a signal in the middle leaves it saying which. A table the role may not vacuum
    (PostgreSQL would skip it with a WARNING) is not sent to the server: it goes to
    ``result.vacuum.skipped``, with why."""
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
        changed = list(_changed(result))
        denied = _not_permitted(connection, changed)  # one query for all of them
        for table in changed:
            if table in denied:
                result.vacuum.skipped[table] = denied[table][0]
                continue
            connection.execute(text(f"VACUUM (ANALYZE) {quote(table)}"))
            result.vacuum.vacuumed.append(table)
