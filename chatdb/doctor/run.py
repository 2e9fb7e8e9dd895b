"""Runs doctor's checks: each in a transaction of its own, with local timeouts (see the
package's docstring); ``diagnose()`` is what ``chatdb doctor`` calls."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from chatdb import migrations, size_history
from chatdb.doctor import activity, bloat, growth, index_checks, retention, statements, tables
from chatdb.doctor.model import (
    OK,
    SKIPPED,
    WARN,
    Finding,
    Options,
    Report,
)
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe, learn
from chatdb.errors import StateError, one_line
from chatdb.schema import CHATDB_TABLES, HEAD_REVISION

#: Local to each check's transaction: no check waits long for a lock (amcheck and
#: pgstattuple take ACCESS SHARE, which only an ACCESS EXCLUSIVE holder blocks) and none
#: reads for long unless --deep asked it to.
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "30s"

Check = Callable[[Probe], list[Finding]]

#: (area, check, reads data) in report order; the data-reading ones run with --deep only
#: or read more then.
_CHECKS: tuple[tuple[str, Check, bool], ...] = (
    ("vacuum", tables.vacuum, False),
    ("bloat", bloat.bloat, True),
    ("integrity", index_checks.integrity, True),
    ("indexes", index_checks.index_use, False),
    ("statements", statements.statements, False),
    ("connections", activity.connections, False),
    ("wraparound", tables.wraparound, False),
    ("cache", tables.cache, False),
    ("retention", retention.retention, True),
    ("replication", activity.replication_slots, False),
)


def diagnose(engine: Engine, options: Options) -> Report:
    """Run every check (those that read data only with ``options.deep``)."""
    started = time.perf_counter()
    with engine.connect() as connection:
        revision, schema_finding = _revision(connection)
        connection.rollback()
        recorded = size_history.record(connection, options.command) if options.record else False
        with connection.begin() as transaction:
            probe = learn(connection, options, [table.name for table in CHATDB_TABLES])
            transaction.rollback()
        report = Report(
            [], probe.database, probe.user, _server_version(connection), revision, recorded=recorded
        )
        if schema_finding is not None:
            report.findings.append(schema_finding)
        report.findings.append(_privileges(probe))
        deep_started = 0.0
        for area, check, reads in _CHECKS:
            if area == "integrity" and not options.deep:
                continue
            began = time.perf_counter()
            report.findings += _run(connection, probe, area, check, deep=options.deep and reads)
            if options.deep and reads:
                deep_started += time.perf_counter() - began
            if area == "cache":  # growth goes before retention, as the report lists them
                found, report.growth = _run_growth(connection, probe, recorded)
                report.findings += found
        report.deep_seconds = deep_started
        report.deep_read_bytes = probe.read_bytes
    report.elapsed = time.perf_counter() - started
    return report


def _server_version(connection: Connection) -> str:
    version = connection.execute(text("SELECT current_setting('server_version')")).scalar_one()
    connection.rollback()
    return version


def _revision(connection: Connection) -> tuple[str | None, Finding | None]:
    """The database's revision, and a finding when it is behind head. A database without
    chatdb's schema, or at a revision this chatdb does not know, is an error."""
    current = migrations.current_revision(connection)
    if current == HEAD_REVISION:
        return current, Finding("schema", None, "revision", OK, current, HEAD_REVISION, f"at head {current}")
    known = [revision.id for revision in migrations.chain()]
    if current is None:
        raise StateError("the database has no chatdb schema yet", hint="run `chatdb migrate` first")
    if current not in known:
        raise migrations.unknown_revision(current)
    behind = len(known) - known.index(current) - 1
    return current, Finding(
        "schema",
        None,
        "revision",
        WARN,
        current,
        HEAD_REVISION,
        f"at revision {current}, {behind} behind head {HEAD_REVISION}: checks of what is missing are skipped",
        "-- from a shell: chatdb migrate",
    )


def _privileges(probe: Probe) -> Finding:
    """Said once: what the role lacks, and which checks see less for it."""
    if probe.superuser:
        return Finding("privileges", probe.user, "pg_monitor", OK, detail=f"role {probe.user} is a superuser")
    if probe.read_all_stats and probe.scan_tables:
        return Finding(
            "privileges",
            probe.user,
            "pg_monitor",
            OK,
            detail=f"role {probe.user} has pg_read_all_stats and pg_stat_scan_tables (pg_monitor)",
        )
    return Finding(
        "privileges",
        probe.user,
        "pg_monitor",
        SKIPPED,
        detail=f"role {probe.user} is not a member of pg_monitor: other roles' sessions and statements are "
        "hidden from the connections and statements checks, and --deep cannot run pgstattuple; "
        f"{PRIVILEGE_HINT}",
    )


def _begin(connection: Connection, deep: bool) -> None:
    connection.execute(
        text(
            "SELECT set_config('lock_timeout', :lock, true),"
            " set_config('statement_timeout', :statement, true)"
        ),
        {"lock": LOCK_TIMEOUT, "statement": "0" if deep else STATEMENT_TIMEOUT},
    )


def _failure(area: str, exc: DBAPIError, probe: Probe) -> Finding | None:
    """A check that could not run for a reason that is no fault of the database's."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate == "42501":  # insufficient_privilege
        return Finding(
            area,
            None,
            area,
            SKIPPED,
            detail=f"role {probe.user} lacks a privilege: {one_line(exc)} ({PRIVILEGE_HINT})",
        )
    if sqlstate == "57014":  # query_canceled: the statement timeout
        return Finding(area, None, area, SKIPPED, detail=f"took longer than {STATEMENT_TIMEOUT}; not checked")
    if sqlstate == "55P03":  # lock_not_available
        return Finding(
            area, None, area, SKIPPED, detail=f"waited longer than {LOCK_TIMEOUT} for a lock; not checked"
        )
    return None


def _run(connection: Connection, probe: Probe, area: str, check: Check, *, deep: bool) -> list[Finding]:
    transaction = connection.begin()
    try:
        _begin(connection, deep)
        return check(probe)
    except DBAPIError as exc:
        skipped = _failure(area, exc, probe)
        if skipped is None:
            raise
        return [skipped]
    finally:
        if transaction.is_active:
            transaction.rollback()


def _run_growth(
    connection: Connection, probe: Probe, recorded: bool
) -> tuple[list[Finding], growth.Growth | None]:
    transaction = connection.begin()
    try:
        _begin(connection, False)
        return growth.growth(probe, recorded)
    except DBAPIError as exc:
        skipped = _failure("growth", exc, probe)
        if skipped is None:
            raise
        return [skipped], None
    finally:
        if transaction.is_active:
            transaction.rollback()
