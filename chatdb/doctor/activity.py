"""Sessions and what holds back cleanup: connections in use, sessions idle in a
transaction, the longest query, long transactions, and replication slots that retain WAL.

Other roles' sessions show their state and query only to members of pg_read_all_stats
(part of pg_monitor); without it these checks see the role's own sessions and say so."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Row

from chatdb import citus, lifecycle
from chatdb.db import mask_text
from chatdb.doctor import shards
from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, count, duration, size
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe
from chatdb.doctor.query_text import without_constants

#: chatdb's archive, restore and purge hold a transaction-level advisory lock in an open,
#: idle transaction for their whole run (their guard). It holds no snapshot and no
#: transaction id, so it holds back nothing; the checks name it instead of warning.
_GUARD = (
    "SELECT pid FROM pg_locks"
    " WHERE locktype = 'advisory' AND granted AND classid = :a AND objid = :b AND objsubid = 2"
)


#: A client's session. Another role's shows its type only to pg_read_all_stats; its user and
#: database show to all.
_CLIENT = (
    "(backend_type = 'client backend'"
    " OR (backend_type IS NULL AND usename IS NOT NULL AND datname IS NOT NULL))"
)


def _guard() -> dict[str, int]:
    key = lifecycle.GUARD_KEY
    return {"a": key[0], "b": key[1]}


def _hidden(probe: Probe) -> str:
    """A note when other roles' sessions exist that this role cannot see into."""
    if probe.read_all_stats:
        return ""
    hidden = int(
        probe.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            f" AND state IS NULL AND {_CLIENT}"
        )
        or 0
    )
    if not hidden:
        return ""
    return (
        f" ({count(hidden, 'session')} of other roles hidden: role {probe.user} is not in "
        f"pg_read_all_stats; {PRIVILEGE_HINT})"
    )


_POOLER = "-- put a pooler (PgBouncer in transaction mode) in front of the server, or raise max_connections"


_IN_USE = (
    f"SELECT count(*) FILTER (WHERE {_CLIENT}) AS used,"
    " current_setting('max_connections')::int AS maximum,"
    " current_setting('superuser_reserved_connections')::int"
    "  + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved"
    " FROM pg_stat_activity"
)


def connections(probe: Probe) -> list[Finding]:
    found = _in_use(probe, probe.one(_IN_USE), "server", None)
    if probe.sharded:
        # The coordinator's queries reach the shards through connections of its own to
        # each worker: a worker's slots run out as a server's do.
        command = f"SELECT row_to_json(x) FROM ({_IN_USE}) x"
        for worker in citus.on_workers(probe.connection, command):
            if worker.error is not None or not isinstance(worker.value, dict):
                detail = f"the worker could not be read: {worker.error}"
                found.append(
                    Finding("connections", f"server {worker.node}", "in use", SKIPPED, detail=detail)
                )
                continue
            row = SimpleNamespace(**worker.value)
            found += _in_use(probe, row, f"server {worker.node}", worker.node)
    found += _idle_in_transaction(probe)
    found += _longest_query(probe)
    found += _long_transactions(probe)
    if probe.sharded:
        found.append(
            shards.only_coordinator("connections", "sessions idle in a transaction, queries and transactions")
        )
    return found


def _in_use(probe: Probe, row: Any, name: str, node: str | None) -> list[Finding]:
    limits = probe.thresholds
    available = max(1, int(row.maximum) - int(row.reserved))
    used = int(row.used)
    warn_at = math.ceil(limits.connections_warn * available)
    fail_at = math.ceil(limits.connections_fail * available)
    detail = (
        f"{used:,} of {available:,} connections in use (max_connections {row.maximum}, "
        f"{row.reserved} reserved for superusers and their like)"
    )
    found = []
    if used >= fail_at:
        found.append(
            Finding(
                "connections",
                name,
                "in use",
                FAIL,
                used,
                warn_at,
                detail + ": new connections are about to be refused",
                _POOLER,
                "connections",
                node,
            )
        )
    elif used >= warn_at:
        found.append(
            Finding(
                "connections",
                name,
                "in use",
                WARN,
                used,
                warn_at,
                detail,
                _POOLER,
                "connections",
                node,
            )
        )
    else:
        found.append(
            Finding("connections", name, "in use", OK, used, warn_at, detail, unit="connections", node=node)
        )
    return found


def _session(
    check: str,
    subject: str | None,
    status: str,
    seconds: float,
    limit: float,
    detail: str,
    fix: str | None = None,
) -> Finding:
    """A finding about a session, a query or a transaction, measured in seconds."""
    return Finding("connections", subject, check, status, seconds, limit, detail, fix, "seconds")


#: What the guard of a running archive, restore or purge is, where a check meets it.
_THE_GUARD = "the guard of a running chatdb archive, restore or purge (holds no snapshot)"


def _all_clear(probe: Probe, found: list[Finding], check: str, limit: float, detail: str) -> list[Finding]:
    """``found``, with one finding that says all is well when none of it warns."""
    if not any(f.status == WARN for f in found):
        found.append(_session(check, probe.database, OK, 0, limit, detail + _hidden(probe)))
    return found


#: The other sessions on this database, as pg_stat_activity ``a``.
_OTHERS = "FROM pg_stat_activity a WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"


def _sessions(probe: Probe, condition: str, order: str, limit: float) -> Sequence[Row]:
    """The other sessions on this database that meet ``condition`` (in terms of
    pg_stat_activity ``a`` and ``:limit``): who, their state, how long they have been idle
    and their transaction open, whether it holds back vacuum, and whether it is a guard."""
    return probe.rows(
        "SELECT a.pid, a.usename, a.application_name, a.state,"
        " extract(epoch FROM now() - a.state_change) AS idle,"
        " extract(epoch FROM now() - a.xact_start) AS open,"
        " a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL AS holds,"
        f" a.pid IN ({_GUARD}) AS guard {_OTHERS} AND {condition} ORDER BY {order}",
        limit=limit,
        **_guard(),
    )


def _who(row: Row) -> str:
    return f"user {row.usename}, application {row.application_name or '(none)'}"


def _idle_in_transaction(probe: Probe) -> list[Finding]:
    limit = probe.thresholds.idle_in_transaction_seconds
    rows = _sessions(
        probe,
        "a.state LIKE 'idle in transaction%' AND a.state_change <= now() - make_interval(secs => :limit)",
        "a.state_change",
        limit,
    )
    found = []
    for row in rows:
        who = _who(row)
        idle = round(float(row.idle), 1)
        if row.guard:
            found.append(
                _session("idle in transaction", f"pid {row.pid}", OK, idle, limit, f"{who}: {_THE_GUARD}")
            )
            continue
        holds = (
            "it holds back vacuum on every table, and keeps its locks"
            if row.holds
            else "it keeps any locks it took (it holds no snapshot: vacuum goes on)"
        )
        detail = (
            f"{who}: {row.state} for {duration(row.idle)} (transaction open {duration(row.open)}); "
            f"{holds}, which purge and archive batches skip or wait for"
        )
        fix = f"SELECT pg_terminate_backend({row.pid});  -- ends that session; its transaction rolls back"
        found.append(_session("idle in transaction", f"pid {row.pid}", WARN, idle, limit, detail, fix))
    return _all_clear(
        probe,
        found,
        "idle in transaction",
        limit,
        f"no session idle in a transaction for longer than {duration(limit)}",
    )


def _longest_query(probe: Probe) -> list[Finding]:
    row = probe.rows(
        "SELECT a.pid, a.usename, a.application_name, extract(epoch FROM now() - a.query_start) AS running,"
        f" a.query {_OTHERS}"
        " AND a.backend_type = 'client backend' AND a.state = 'active' ORDER BY a.query_start LIMIT 1"
    )
    limit = probe.thresholds.long_query_seconds
    if not row:
        return [
            _session(
                "longest query", probe.database, OK, 0, limit, "no other query is running" + _hidden(probe)
            )
        ]
    row = row[0]
    running = round(float(row.running), 1)
    # Each string constant as '…' (a password in ALTER ROLE, in a dblink connection string,
    # in a DO block's body is one); what is left goes through mask_text as well.
    query = mask_text(" ".join(without_constants(row.query or "").split())[:200])
    detail = f"pid {row.pid}, {_who(row)}: running for {duration(running)}: {query}"
    if running >= limit:
        fix = f"SELECT pg_cancel_backend({row.pid});  -- cancels that query (the session stays)"
        return [_session("longest query", f"pid {row.pid}", WARN, running, limit, detail, fix)]
    return [_session("longest query", f"pid {row.pid}", OK, running, limit, detail + _hidden(probe))]


def _long_transactions(probe: Probe) -> list[Finding]:
    """Transactions (and prepared transactions) open longer than the threshold: while one
    holds a snapshot or a transaction id, vacuum cannot remove rows deleted after it began."""
    limit = probe.thresholds.long_transaction_seconds
    rows = _sessions(probe, "a.xact_start <= now() - make_interval(secs => :limit)", "a.xact_start", limit)
    found = []
    for row in rows:
        who = _who(row)
        opened = round(float(row.open), 1)
        if row.guard and not row.holds:
            found.append(
                _session("long transaction", f"pid {row.pid}", OK, opened, limit, f"{who}: {_THE_GUARD}")
            )
            continue
        holds = "holds back vacuum on every table" if row.holds else "holds its locks"
        detail = f"{who}: a transaction open for {duration(row.open)} ({row.state}); it {holds}"
        fix = f"SELECT pg_terminate_backend({row.pid});  -- ends that session; its transaction rolls back"
        found.append(_session("long transaction", f"pid {row.pid}", WARN, opened, limit, detail, fix))
    prepared = probe.rows(
        "SELECT gid, owner, extract(epoch FROM now() - prepared) AS open FROM pg_prepared_xacts"
        " WHERE database = current_database() AND prepared <= now() - make_interval(secs => :limit)"
        " ORDER BY prepared",
        limit=limit,
    )
    for row in prepared:
        detail = (
            f"a prepared transaction of {row.owner}, open for {duration(row.open)}: it holds back vacuum "
            "and keeps its locks until its coordinator commits or rolls it back"
        )
        fix = (
            f"ROLLBACK PREPARED '{row.gid.replace(chr(39), chr(39) * 2)}';  -- or COMMIT PREPARED, "
            "as its coordinator decided"
        )
        opened = round(float(row.open), 1)
        found.append(_session("long transaction", f"prepared {row.gid}", WARN, opened, limit, detail, fix))
    return _all_clear(
        probe, found, "long transaction", limit, f"no transaction open longer than {duration(limit)}"
    )


def replication_slots(probe: Probe) -> list[Finding]:
    """Slots whose consumer is not connected keep WAL (and, for their xmin, dead rows)."""
    limit = probe.thresholds.slot_retained_bytes
    rows = probe.rows(
        "SELECT slot_name, slot_type, active, wal_status,"
        " xmin IS NOT NULL OR catalog_xmin IS NOT NULL AS xmin,"
        " pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        "  ELSE pg_current_wal_lsn() END, restart_lsn)::bigint AS retained"
        " FROM pg_replication_slots ORDER BY slot_name"
    )
    coordinator = [shards.only_coordinator("replication", "replication slots")] if probe.sharded else []
    if not rows:
        return [
            *coordinator,
            Finding(
                "replication",
                "server",
                "replication slots",
                OK,
                0,
                limit,
                "no replication slots",
                unit="bytes",
            ),
        ]
    found = coordinator
    for row in rows:
        retained = int(row.retained or 0)
        state = "active" if row.active else "inactive"
        detail = f"{row.slot_type} slot, {state}, retains {size(retained)} of WAL"
        if row.wal_status:
            detail += f" (wal_status {row.wal_status})"
        if row.xmin:
            detail += "; its xmin holds back vacuum"
        fix = (
            f"SELECT pg_drop_replication_slot('{row.slot_name}');  -- only once its consumer is gone for good"
        )
        if not row.active and (retained >= limit or row.wal_status == "lost"):
            found.append(
                Finding(
                    "replication",
                    row.slot_name,
                    "replication slot",
                    WARN,
                    retained,
                    limit,
                    detail,
                    fix,
                    "bytes",
                )
            )
        else:
            found.append(
                Finding(
                    "replication",
                    row.slot_name,
                    "replication slot",
                    OK,
                    retained,
                    limit,
                    detail,
                    unit="bytes",
                )
            )
    return found
