"""Sessions and what holds back cleanup: connections in use, sessions idle in a
transaction, the longest query, long transactions, and replication slots that retain WAL.

Other roles' sessions show their state and query only to members of pg_read_all_stats
(part of pg_monitor); without it these checks see the role's own sessions and say so."""

from __future__ import annotations

import math

from chatdb import lifecycle
from chatdb.doctor.model import FAIL, OK, WARN, Finding, count, duration, size
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe

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


def connections(probe: Probe) -> list[Finding]:
    limits = probe.thresholds
    row = probe.one(
        f"SELECT count(*) FILTER (WHERE {_CLIENT}) AS used,"
        " current_setting('max_connections')::int AS maximum,"
        " current_setting('superuser_reserved_connections')::int"
        "  + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved"
        " FROM pg_stat_activity"
    )
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
                "server",
                "in use",
                FAIL,
                used,
                warn_at,
                detail + ": new connections are about to be refused",
                _POOLER,
                "connections",
            )
        )
    elif used >= warn_at:
        found.append(
            Finding(
                "connections",
                "server",
                "in use",
                WARN,
                used,
                warn_at,
                detail,
                _POOLER,
                "connections",
            )
        )
    else:
        found.append(
            Finding("connections", "server", "in use", OK, used, warn_at, detail, unit="connections")
        )
    found += _idle_in_transaction(probe)
    found += _longest_query(probe)
    found += _long_transactions(probe)
    return found


def _idle_in_transaction(probe: Probe) -> list[Finding]:
    limit = probe.thresholds.idle_in_transaction_seconds
    rows = probe.rows(
        "SELECT a.pid, a.usename, a.application_name, a.state,"
        " extract(epoch FROM now() - a.state_change) AS idle,"
        " extract(epoch FROM now() - a.xact_start) AS open,"
        " a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL AS holds,"
        f" a.pid IN ({_GUARD}) AS guard"
        " FROM pg_stat_activity a WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
        " AND a.state LIKE 'idle in transaction%' AND a.state_change <= now() - make_interval(secs => :limit)"
        " ORDER BY a.state_change",
        limit=limit,
        **_guard(),
    )
    found = []
    for row in rows:
        who = f"user {row.usename}, application {row.application_name or '(none)'}"
        if row.guard:
            found.append(
                Finding(
                    "connections",
                    f"pid {row.pid}",
                    "idle in transaction",
                    OK,
                    round(float(row.idle), 1),
                    limit,
                    f"{who}: the guard of a running chatdb archive, restore or purge (holds no snapshot)",
                    unit="seconds",
                )
            )
            continue
        found.append(
            Finding(
                "connections",
                f"pid {row.pid}",
                "idle in transaction",
                WARN,
                round(float(row.idle), 1),
                limit,
                f"{who}: {row.state} for {duration(row.idle)} (transaction open {duration(row.open)}); "
                + (
                    "it holds back vacuum on every table, and keeps its locks"
                    if row.holds
                    else "it keeps any locks it took (it holds no snapshot: vacuum goes on)"
                )
                + ", which purge and archive batches skip or wait for",
                f"SELECT pg_terminate_backend({row.pid});  -- ends that session; its transaction rolls back",
                "seconds",
            )
        )
    if not any(f.status == WARN for f in found):
        found.append(
            Finding(
                "connections",
                probe.database,
                "idle in transaction",
                OK,
                0,
                limit,
                f"no session idle in a transaction for longer than {duration(limit)}" + _hidden(probe),
                unit="seconds",
            )
        )
    return found


def _longest_query(probe: Probe) -> list[Finding]:
    limit = probe.thresholds.long_query_seconds
    row = probe.rows(
        "SELECT pid, usename, application_name, extract(epoch FROM now() - query_start) AS running,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 200) AS query"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend' AND state = 'active' ORDER BY query_start LIMIT 1"
    )
    if not row:
        return [
            Finding(
                "connections",
                probe.database,
                "longest query",
                OK,
                0,
                limit,
                "no other query is running" + _hidden(probe),
                unit="seconds",
            )
        ]
    row = row[0]
    running = round(float(row.running), 1)
    detail = (
        f"pid {row.pid}, user {row.usename}, application {row.application_name or '(none)'}: "
        f"running for {duration(running)}: {row.query}"
    )
    if running >= limit:
        return [
            Finding(
                "connections",
                f"pid {row.pid}",
                "longest query",
                WARN,
                running,
                limit,
                detail,
                f"SELECT pg_cancel_backend({row.pid});  -- cancels that query (the session stays)",
                "seconds",
            )
        ]
    return [
        Finding(
            "connections",
            f"pid {row.pid}",
            "longest query",
            OK,
            running,
            limit,
            detail + _hidden(probe),
            unit="seconds",
        )
    ]


def _long_transactions(probe: Probe) -> list[Finding]:
    """Transactions (and prepared transactions) open longer than the threshold: while one
    holds a snapshot or a transaction id, vacuum cannot remove rows deleted after it began."""
    limit = probe.thresholds.long_transaction_seconds
    rows = probe.rows(
        "SELECT a.pid, a.usename, a.application_name, a.state,"
        " extract(epoch FROM now() - a.xact_start) AS open,"
        " a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL AS holds,"
        f" a.pid IN ({_GUARD}) AS guard"
        " FROM pg_stat_activity a WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
        " AND a.xact_start <= now() - make_interval(secs => :limit) ORDER BY a.xact_start",
        limit=limit,
        **_guard(),
    )
    found = []
    for row in rows:
        who = f"user {row.usename}, application {row.application_name or '(none)'}"
        if row.guard and not row.holds:
            found.append(
                Finding(
                    "connections",
                    f"pid {row.pid}",
                    "long transaction",
                    OK,
                    round(float(row.open), 1),
                    limit,
                    f"{who}: the guard of a running chatdb archive, restore or purge (holds no snapshot)",
                    unit="seconds",
                )
            )
            continue
        holds = "holds back vacuum on every table" if row.holds else "holds its locks"
        found.append(
            Finding(
                "connections",
                f"pid {row.pid}",
                "long transaction",
                WARN,
                round(float(row.open), 1),
                limit,
                f"{who}: a transaction open for {duration(row.open)} ({row.state}); it {holds}",
                f"SELECT pg_terminate_backend({row.pid});  -- ends that session; its transaction rolls back",
                "seconds",
            )
        )
    prepared = probe.rows(
        "SELECT gid, owner, extract(epoch FROM now() - prepared) AS open FROM pg_prepared_xacts"
        " WHERE database = current_database() AND prepared <= now() - make_interval(secs => :limit)"
        " ORDER BY prepared",
        limit=limit,
    )
    for row in prepared:
        found.append(
            Finding(
                "connections",
                f"prepared {row.gid}",
                "long transaction",
                WARN,
                round(float(row.open), 1),
                limit,
                f"a prepared transaction of {row.owner}, open for {duration(row.open)}: it holds back vacuum "
                "and keeps its locks until its coordinator commits or rolls it back",
                f"ROLLBACK PREPARED '{row.gid.replace(chr(39), chr(39) * 2)}';  -- or COMMIT PREPARED, "
                "as its coordinator decided",
                "seconds",
            )
        )
    if not any(f.status == WARN for f in found):
        found.append(
            Finding(
                "connections",
                probe.database,
                "long transaction",
                OK,
                0,
                limit,
                f"no transaction open longer than {duration(limit)}" + _hidden(probe),
                unit="seconds",
            )
        )
    return found


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
    if not rows:
        return [
            Finding(
                "replication",
                "server",
                "replication slots",
                OK,
                0,
                limit,
                "no replication slots",
                unit="bytes",
            )
        ]
    found = []
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
