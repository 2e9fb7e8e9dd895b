"""Slow statements, from pg_stat_statements: those that touch chatdb's tables, ranked by
total time, each matched to its query pattern (chatdb/patterns.py) where it is one."""

from __future__ import annotations

import re

from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.exc import DBAPIError

from chatdb import patterns
from chatdb.db import mask_text
from chatdb.doctor.model import OK, SKIPPED, WARN, Finding, count
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe
from chatdb.doctor.query_text import without_constants
from chatdb.schema import CHATDB_TABLES

ENABLE = (
    "add pg_stat_statements to shared_preload_libraries and restart the server, then "
    "CREATE EXTENSION pg_stat_statements; in this database (on a managed service, enable it in "
    "the provider's settings)"
)

#: What is left of a statement once its values are gone: pg_stat_statements writes them as
#: $1, $2...; SQLAlchemy, as %(name)s. Quoting and spacing do not count.
_PARAMETER = re.compile(r"\$\d+|%\(\w+\)s|%s|'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b")


def shape(sql: str) -> str:
    return " ".join(_PARAMETER.sub("?", sql).replace('"', "").lower().split())


def pattern_shapes() -> dict[str, str]:
    """Each pattern's statement, as the application's SQLAlchemy and psycopg send it."""
    dialect = PGDialect_psycopg()
    return {shape(str(p.statement().compile(dialect=dialect))): p.name for p in patterns.PATTERNS}


def _unavailable(why: str) -> list[Finding]:
    return [Finding("statements", None, "pg_stat_statements", SKIPPED, detail=why)]


def statements(probe: Probe) -> list[Finding]:
    limits = probe.thresholds
    view = probe.function("pg_stat_statements", "pg_stat_statements")
    if view is None:
        loaded = "pg_stat_statements" in (
            probe.scalar("SELECT current_setting('shared_preload_libraries')") or ""
        )
        how = "CREATE EXTENSION pg_stat_statements; in this database" if loaded else ENABLE
        return _unavailable(f"pg_stat_statements is not available: {how}")
    tables = "|".join(re.escape(table.name) for table in CHATDB_TABLES)
    # Before PostgreSQL 13: total_time, mean_time, max_time.
    prefix = "" if probe.version < 130000 else "exec_"
    savepoint = probe.connection.begin_nested()
    try:
        rows = probe.rows(
            f"SELECT s.queryid, s.query, s.calls, s.total_{prefix}time AS total,"
            f" s.mean_{prefix}time AS mean, s.max_{prefix}time AS maximum, r.rolname"
            f" FROM {view} s LEFT JOIN pg_roles r ON r.oid = s.userid"
            " WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND s.query ~* :tables ORDER BY total DESC LIMIT :top",
            tables=rf"\m({tables})\M",
            top=limits.statements_top,
        )
        hidden = 0
        if not probe.read_all_stats:
            hidden = int(
                probe.scalar(
                    f"SELECT count(*) FROM {view} s WHERE s.dbid = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database()) AND s.query = '<insufficient privilege>'"
                )
                or 0
            )
        reset = None
        if probe.version >= 140000:
            reset = probe.scalar(
                f"SELECT stats_reset FROM {probe.function('pg_stat_statements', 'pg_stat_statements_info')}"
            )
    except DBAPIError as exc:
        savepoint.rollback()
        if getattr(exc.orig, "sqlstate", None) == "55000":  # object_not_in_prerequisite_state
            return _unavailable(f"pg_stat_statements is installed but not loaded: {ENABLE}")
        raise
    savepoint.commit()
    since = f" since {reset:%Y-%m-%d %H:%M %Z}" if reset else ""
    note = ""
    if hidden:
        note = (
            f"; {count(hidden, 'statement')} of other roles hidden (role {probe.user} is not in "
            f"pg_read_all_stats; {PRIVILEGE_HINT})"
        )
    if not rows:
        return [
            Finding(
                "statements",
                probe.database,
                "slow statements",
                OK,
                None,
                limits.slow_statement_ms,
                f"no statement on chatdb's tables recorded{since}{note}",
                unit="ms",
            )
        ]
    known = pattern_shapes()
    found = []
    for rank, row in enumerate(rows, 1):
        pattern = known.get(shape(row.query))
        mean = round(float(row.mean), 3)
        # pg_stat_statements leaves the constants of some statements (a DO block's body).
        text = mask_text(" ".join(without_constants(row.query).split()))
        shown = text if len(text) <= 300 else text[:297] + "..."
        what = f"pattern: {pattern}" if pattern else "not one of chatdb's query patterns"
        detail = (
            f"#{rank} by total time{since}: {float(row.total):,.0f} ms in {count(int(row.calls), 'call')}, "
            f"mean {float(row.mean):,.2f} ms, max {float(row.maximum):,.2f} ms, by {row.rolname};"
            f" {what}: {shown}" + (note if rank == 1 else "")
        )
        name = pattern or f"queryid {row.queryid}"
        if mean > limits.slow_statement_ms:
            fix = (
                "-- chatdb verify-indexes proves that this pattern's index serves it; then look at its plan"
                " with EXPLAIN (ANALYZE, BUFFERS)"
                if pattern
                else "-- look at its plan: EXPLAIN (ANALYZE, BUFFERS) with the values of a slow call"
            )
            found.append(
                Finding(
                    "statements",
                    name,
                    "slow statement",
                    WARN,
                    mean,
                    limits.slow_statement_ms,
                    detail,
                    fix,
                    "ms",
                )
            )
        else:
            found.append(
                Finding(
                    "statements",
                    name,
                    "slow statement",
                    OK,
                    mean,
                    limits.slow_statement_ms,
                    detail,
                    unit="ms",
                )
            )
    return found
