"""The size history: every ``status`` and ``doctor`` run records the size and row estimate
of each of chatdb's tables (and ``users``), and the size of the whole database, in
``chatdb_size_history``; ``chatdb.doctor.growth`` reads it back.

A module of its own so that ``status`` records a sample without importing the doctor."""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from chatdb import citus
from chatdb.schema import CHATDB_TABLES, chatdb_size_history

HISTORY = chatdb_size_history.name
#: Samples older than this are deleted when a new one is recorded (by a role that may).
KEEP_DAYS = 730

#: What a recording may run into without it being an error of the command: a database not
#: yet migrated, a role without INSERT, a read-only transaction (a standby).
_CANNOT_RECORD = {"42P01", "42501", "25006"}


def tracked_tables() -> tuple[str, ...]:
    return ("users", *(table.name for table in CHATDB_TABLES))


def record(connection: Connection, command: str) -> bool:
    """Record one sample of every table and of the database, in a transaction of its own;
    False when it cannot (no history table, no privilege, read-only). Old samples go."""
    if connection.in_transaction():
        connection.rollback()
    try:
        with connection.begin():
            allowed = connection.execute(
                text(
                    "SELECT CASE WHEN to_regclass(:table) IS NULL OR pg_is_in_recovery()"
                    " OR current_setting('transaction_read_only')::bool THEN false"
                    " ELSE has_table_privilege(to_regclass(:table), 'INSERT') END,"
                    " CASE WHEN to_regclass(:table) IS NULL THEN false"
                    " ELSE has_table_privilege(to_regclass(:table), 'DELETE') END"
                ),
                {"table": HISTORY},
            ).one()
            if not allowed[0]:
                return False
            # On Citus the coordinator's table of a distributed (or reference) one holds
            # nothing: its sample is the sum over its shards.
            sharded = citus.sizes(connection, list(tracked_tables())) if citus.enabled(connection) else {}
            for name, (estimate, total) in sharded.items():
                connection.execute(
                    text(
                        f"INSERT INTO {HISTORY} (command, table_name, row_estimate, total_bytes)"
                        " VALUES (:command, :name, greatest(:estimate, 0), :total)"
                    ),
                    {"command": command, "name": name, "estimate": estimate, "total": total},
                )
            connection.execute(
                text(
                    f"INSERT INTO {HISTORY} (command, table_name, row_estimate, total_bytes)"
                    " SELECT :command, c.relname,"
                    "  coalesce(nullif(s.n_live_tup, 0), greatest(c.reltuples, 0))::bigint,"
                    "  pg_total_relation_size(c.oid)"
                    " FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid"
                    " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')"
                    "  AND c.relname = ANY(:names)"
                    " UNION ALL SELECT :command, NULL, NULL, pg_database_size(current_database())"
                ),
                {"command": command, "names": [n for n in tracked_tables() if n not in sharded]},
            )
            if allowed[1]:
                connection.execute(
                    text(f"DELETE FROM {HISTORY} WHERE recorded_at < now() - make_interval(days => :days)"),
                    {"days": KEEP_DAYS},
                )
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) in _CANNOT_RECORD:
            return False
        raise
    return True
