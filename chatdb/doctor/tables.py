"""Checks of chatdb's tables from the statistics: vacuum and analyze, transaction ID
wraparound, and the cache hit ratio. Catalog and statistics only: nothing here reads a
table, so the cost does not grow with the data."""

from __future__ import annotations

import datetime as dt
import math
from types import SimpleNamespace
from typing import Any

from chatdb import citus
from chatdb.defaults import dead_limit
from chatdb.doctor import shards
from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, count, duration
from chatdb.doctor.probe import Probe
from chatdb.lifecycle.vacuuming import may_vacuum, run_by

#: Which lifecycle commands delete rows from which table, and the count that says how many
#: (chatdb_runs.counts): an archive moves rows out of the hot tables, a restore out of the
#: archive, a purge deletes from both.
_DELETED_BY = {
    "conversations": (("purge", "conversations"), ("archive", "conversations")),
    "messages": (("purge", "messages"), ("archive", "messages")),
    "conversations_archive": (
        ("purge", "archive_conversations"),
        ("archive restore", "archive_conversations"),
    ),
    "messages_archive": (("purge", "archive_messages"), ("archive restore", "archive_messages")),
}


def _autovacuum_off(reloptions: list[str] | None) -> bool:
    for option in reloptions or ():
        name, _, value = option.partition("=")
        if name == "autovacuum_enabled" and value.lower() in ("false", "off", "no", "0", "f", "n"):
            return True
    return False


def _when(latest: dt.datetime | None, manual: dt.datetime | None, now: dt.datetime) -> str:
    if latest is None:
        return "never"
    how = "manual" if manual is not None and manual == latest else "autovacuum"
    return f"{duration((now - latest).total_seconds())} ago ({how})"


def _recent_runs(probe: Probe) -> list[dict[str, Any]]:
    """The latest archive, restore and purge runs that ended, newest first."""
    if "chatdb_runs" not in probe.tables:
        return []
    rows = probe.rows(
        "SELECT id, command, finished_at, counts FROM chatdb_runs"
        " WHERE command IN ('archive', 'archive restore', 'purge') AND finished_at IS NOT NULL"
        " ORDER BY finished_at DESC LIMIT 50"
    )
    return [dict(row._mapping) for row in rows]


def _run_since(table: str, runs: list[dict[str, Any]], since: dt.datetime | None) -> str:
    """The latest run that deleted rows from ``table`` after ``since`` (its last vacuum)."""
    for run in runs:
        if since is not None and run["finished_at"] <= since:
            break
        for command, key in _DELETED_BY.get(table, ()):
            rows = int((run["counts"] or {}).get(key) or 0)
            if run["command"] == command and rows:
                return (
                    f"; {run['command']} run {run['id']} removed {count(rows, 'row')} since the last vacuum"
                )
    return ""


def _vacuum(
    table: str,
    check: str,
    status: str,
    rows: int,
    limit: int,
    detail: str,
    fix: str | None = None,
    node: str | None = None,
) -> Finding:
    return Finding("vacuum", table, check, status, rows, limit, detail, fix, "rows", node)


def vacuum(probe: Probe) -> list[Finding]:
    """Dead rows (what archive and purge leave behind) and stale statistics, per table,
    with the time since the last vacuum and analyze, manual or automatic. On Citus, a
    sharded table's are its shards', per node and summed over all (``shards``)."""
    rows = probe.rows(
        "SELECT c.relname, s.n_live_tup, s.n_dead_tup, s.n_mod_since_analyze,"
        " s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze, c.reloptions,"
        " now() AS now, current_setting('autovacuum')::bool AS autovacuum,"
        f" pg_get_userbyid(c.relowner) AS owner, {may_vacuum(probe.version)} AS may_vacuum"
        " FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid WHERE c.oid = ANY(:oids)",
        oids=probe.oids,
    )
    runs = _recent_runs(probe)
    by_name = {row.relname: row for row in rows}
    stats = shards.read(probe, "tables", shards.TABLE_STATS)
    found: list[Finding] = shards.unread("vacuum", stats)
    for name in probe.tables:
        row = by_name.get(name)
        if row is None:
            continue
        if name not in stats:
            found += _vacuum_of(probe, name, name, None, "", row, runs)
            continue
        for group in shards.groups(probe, name, stats[name]):
            values = group.values()
            last_vacuum, last_autovacuum = shards.stalest(values, "last_vacuum", "last_autovacuum")
            last_analyze, last_autoanalyze = shards.stalest(values, "last_analyze", "last_autoanalyze")
            summed = SimpleNamespace(
                n_live_tup=sum(int(v["live"] or 0) for v in values),
                n_dead_tup=sum(int(v["dead"] or 0) for v in values),
                n_mod_since_analyze=sum(int(v["changed"] or 0) for v in values),
                last_vacuum=last_vacuum,
                last_autovacuum=last_autovacuum,
                last_analyze=last_analyze,
                last_autoanalyze=last_autoanalyze,
                reloptions=row.reloptions,
                owner=row.owner,
                may_vacuum=row.may_vacuum,
                now=row.now,
                autovacuum=all(v["autovacuum"] for v in values),
            )
            found += _vacuum_of(probe, name, group.label(name), group.node, f"; {group.where}", summed, runs)
    return found


def _vacuum_of(
    probe: Probe, name: str, label: str, node: str | None, where: str, row: Any, runs: list[dict[str, Any]]
) -> list[Finding]:
    """The dead rows and analyze findings of one table (or, on Citus, of a group of its
    shards, named ``label``, ``where`` saying which)."""
    limits = probe.thresholds
    found: list[Finding] = []
    live, dead, changed = (
        int(row.n_live_tup or 0),
        int(row.n_dead_tup or 0),
        int(row.n_mod_since_analyze or 0),
    )
    vacuumed = max((t for t in (row.last_vacuum, row.last_autovacuum) if t), default=None)
    analyzed = max((t for t in (row.last_analyze, row.last_autoanalyze) if t), default=None)
    last = (
        f"last vacuum {_when(vacuumed, row.last_vacuum, row.now)}, "
        f"last analyze {_when(analyzed, row.last_analyze, row.now)}"
    )
    if _autovacuum_off(row.reloptions):
        last += "; autovacuum is off for this table"
    elif not row.autovacuum:
        last += "; autovacuum is off on this server"
    limit = dead_limit(live + dead, limits.dead_ratio, limits.dead_rows)
    table = probe.qualified(name)
    # VACUUM and ANALYZE skip, with a WARNING, a table this role may not vacuum: its fix
    # says who may run it.
    by = "" if row.may_vacuum else f"to be run by {run_by(row.owner, probe.version)}"
    share = f"{dead / (live + dead):.0%}" if live + dead else "0%"
    if dead >= limit:
        detail = (
            f"{count(dead, 'dead row')} ({share} of the table) wait for VACUUM; {last}"
            + _run_since(name, runs, vacuumed)
            + where
        )
        fix = f"VACUUM (ANALYZE) {table};  -- " + (f"{by}; it " if by else "")
        fix += "takes no lock that blocks reads or writes"
        found.append(_vacuum(label, "dead rows", WARN, dead, limit, detail, fix, node))
    else:
        detail = f"{count(dead, 'dead row')} ({share}); {last}{where}"
        found.append(_vacuum(label, "dead rows", OK, dead, limit, detail, node=node))
    stale_limit = dead_limit(live, limits.dead_ratio, limits.dead_rows)
    # VACUUM (ANALYZE) analyzes too: one statement fixes both.
    analyze = f"ANALYZE {table};" + (f"  -- {by}" if by else "")
    if found[-1].status == WARN:
        analyze = found[-1].fix or analyze
    if analyzed is None and live >= stale_limit:
        detail = f"never analyzed, with {count(live, 'row')}: the planner guesses its sizes{where}"
        found.append(_vacuum(label, "analyze", WARN, changed, stale_limit, detail, analyze, node))
    elif changed >= stale_limit:
        detail = (
            f"{count(changed, 'row')} changed since the last analyze: "
            f"the planner's statistics are stale{where}"
        )
        found.append(_vacuum(label, "analyze", WARN, changed, stale_limit, detail, analyze, node))
    else:
        detail = f"{count(changed, 'row')} changed since the last analyze{where}"
        found.append(_vacuum(label, "analyze", OK, changed, stale_limit, detail, node=node))
    return found


def wraparound(probe: Probe) -> list[Finding]:
    """Transaction ID and multixact ages of the database and of chatdb's tables (TOAST
    included), against autovacuum_freeze_max_age and its multixact twin."""
    settings = probe.one(
        "SELECT current_setting('autovacuum_freeze_max_age')::bigint AS xid,"
        " current_setting('autovacuum_multixact_freeze_max_age')::bigint AS mxid"
    )
    found: list[Finding] = []
    database = probe.one(
        "SELECT age(datfrozenxid) AS xid, mxid_age(datminmxid) AS mxid FROM pg_database"
        " WHERE datname = current_database()"
    )
    oldest = probe.one(
        "SELECT c.oid::regclass::text AS name, age(c.relfrozenxid) AS xid FROM pg_class c"
        " WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> 0"
        " ORDER BY age(c.relfrozenxid) DESC LIMIT 1"
    )
    found += _ages(
        probe,
        probe.database,
        int(database.xid),
        int(database.mxid),
        settings,
        f"VACUUM (FREEZE, ANALYZE) {oldest.name};  -- the oldest table of the database, "
        f"at age {int(oldest.xid):,}; then the next oldest (vacuumdb --all --freeze does them all)",
        what="the database",
    )
    tables = probe.rows(
        "SELECT c.relname, greatest(age(c.relfrozenxid), age(t.relfrozenxid)) AS xid,"
        " greatest(mxid_age(c.relminmxid), mxid_age(t.relminmxid)) AS mxid"
        " FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = ANY(:oids)",
        oids=probe.oids,
    )
    ages = {row.relname: row for row in tables}
    if probe.sharded:
        workers = citus.on_workers(probe.connection, _WORKER_AGE)
        for worker in workers:
            if worker.error is not None or not isinstance(worker.value, dict):
                found.append(
                    Finding(
                        "wraparound",
                        f"{probe.database} on {worker.node}",
                        "transaction id age",
                        SKIPPED,
                        detail=f"the worker could not be read: {worker.error}",
                        node=worker.node,
                    )
                )
                continue
            fix = (
                f"-- on the worker {worker.node}, from a shell: vacuumdb --freeze --analyze "
                f"--dbname={probe.database}"
            )
            found += _ages(
                probe,
                f"{probe.database} on {worker.node}",
                int(worker.value["xid"]),
                int(worker.value["mxid"]),
                settings,
                fix,
                what="the worker's database",
                node=worker.node,
            )
    stats = shards.read(probe, "tables", shards.TABLE_STATS)
    found += shards.unread("wraparound", stats)
    for name in probe.tables:
        row = ages.get(name)
        if row is None:
            continue
        fix = f"VACUUM (FREEZE, ANALYZE) {probe.qualified(name)};"
        if name not in stats:
            found += _ages(probe, name, int(row.xid), int(row.mxid), settings, fix, what="the table")
            continue
        for group in shards.groups(probe, name, stats[name]):
            values = group.values()
            found += _ages(
                probe,
                group.label(name),
                max((int(v["xid"]) for v in values), default=0),
                max((int(v["mxid"]) for v in values), default=0),
                settings,
                fix,
                what="the table's oldest shard" + ("" if group.node is None else f" on {group.node}"),
                node=group.node,
            )
    return found


#: On each worker: the ages of the database there.
_WORKER_AGE = (
    "SELECT json_build_object('xid', age(datfrozenxid), 'mxid', mxid_age(datminmxid))"
    " FROM pg_database WHERE datname = current_database()"
)


def _ages(
    probe: Probe,
    name: str,
    xid: int,
    mxid: int,
    settings: Any,
    fix: str,
    what: str,
    node: str | None = None,
) -> list[Finding]:
    limits = probe.thresholds
    found = []
    for check, age, maximum, setting in (
        ("transaction id age", xid, int(settings.xid), "autovacuum_freeze_max_age"),
        ("multixact age", mxid, int(settings.mxid), "autovacuum_multixact_freeze_max_age"),
    ):
        warn_at = math.ceil(limits.wraparound_ratio * maximum)
        left = 2**31 - age
        if age >= limits.wraparound_fail_age:
            status = FAIL
            detail = (
                f"age {age:,}: {left:,} left before PostgreSQL stops assigning them to protect "
                f"the data; freeze {what} now"
            )
        elif age >= warn_at:
            status = WARN
            detail = (
                f"age {age:,}, past {setting} ({maximum:,}): the anti-wraparound vacuum of {what} "
                "is overdue (is something holding it back, or autovacuum off?)"
            )
        else:
            status = OK
            detail = f"age {age:,} of {setting} {maximum:,}"
        found.append(
            Finding(
                "wraparound",
                name,
                check,
                status,
                age,
                warn_at,
                detail,
                fix if status != OK else None,
                "transactions",
                node,
            )
        )
    return found


def _hit(
    table: str,
    check: str,
    status: str,
    ratio: float | None,
    limit: float,
    detail: str,
    node: str | None = None,
) -> Finding:
    return Finding("cache", table, check, status, ratio, limit, detail, unit="ratio", node=node)


def cache(probe: Probe) -> list[Finding]:
    """The share of each table's and its indexes' block reads that shared_buffers served."""
    rows = probe.rows(
        "SELECT s.relname, s.heap_blks_hit + coalesce(s.toast_blks_hit, 0) AS table_hit,"
        " s.heap_blks_read + coalesce(s.toast_blks_read, 0) AS table_read,"
        " coalesce(s.idx_blks_hit, 0) + coalesce(s.tidx_blks_hit, 0) AS index_hit,"
        " coalesce(s.idx_blks_read, 0) + coalesce(s.tidx_blks_read, 0) AS index_read,"
        " current_setting('shared_buffers') AS shared_buffers"
        " FROM pg_statio_all_tables s WHERE s.relid = ANY(:oids)",
        oids=probe.oids,
    )
    by_name = {row.relname: row for row in rows}
    stats = shards.read(probe, "tables", shards.TABLE_STATS)
    found = shards.unread("cache", stats)
    for name in probe.tables:
        row = by_name.get(name)
        if row is None:
            continue
        if name not in stats:
            found += _cache_of(probe, name, None, "", row)
            continue
        for group in shards.groups(probe, name, stats[name]):
            values = group.values()
            summed = SimpleNamespace(
                shared_buffers=row.shared_buffers,
                **{key: sum(int(v[key] or 0) for v in values) for key in _BLOCKS},
            )
            found += _cache_of(probe, group.label(name), group.node, f"; {group.where}", summed)
    return found


_BLOCKS = ("table_hit", "table_read", "index_hit", "index_read")


def _cache_of(probe: Probe, name: str, node: str | None, where: str, row: Any) -> list[Finding]:
    limits = probe.thresholds
    found = []
    for check, hit, read in (
        ("table cache hit", int(row.table_hit), int(row.table_read)),
        ("index cache hit", int(row.index_hit), int(row.index_read)),
    ):
        total = hit + read
        ratio = round(hit / total, 4) if total else None
        if total < limits.cache_min_blocks:
            detail = f"{count(total, 'block')} read since the statistics were reset: too few to judge{where}"
            found.append(_hit(name, check, OK, ratio, limits.cache_hit_ratio, detail, node))
        elif ratio is not None and ratio < limits.cache_hit_ratio:
            detail = (
                f"{read:,} of {total:,} blocks were not in shared_buffers ({row.shared_buffers}): "
                f"the working set does not fit; more memory, or a smaller hot set (archive){where}"
            )
            found.append(_hit(name, check, WARN, ratio, limits.cache_hit_ratio, detail, node))
        else:
            detail = f"{hit:,} of {total:,} blocks from shared_buffers{where}"
            found.append(_hit(name, check, OK, ratio, limits.cache_hit_ratio, detail, node))
    return found
