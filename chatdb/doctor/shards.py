"""On Citus: the statistics of chatdb's sharded tables, read where the rows are.

The coordinator's table of a distributed one is an empty shell, so its statistics (rows,
dead rows, vacuum and analyze times, index scans, cache reads, ages, pages) say nothing of
the data. These functions read them on every shard placement, on the workers
(``citus.on_placements``), and group them by node, and for a distributed table by table
too, summed over all its shards. A reference table has a whole copy on each node: it is
judged per node only. The checks of ``tables.py``, ``index_checks.py`` and ``bloat.py``
judge each group as they judge a table of one server."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from chatdb import citus
from chatdb.doctor.model import SKIPPED, Finding, count
from chatdb.doctor.probe import Probe

#: One JSON object per shard: its statistics, and those of each of its indexes.
TABLE_STATS = (
    "SELECT json_build_object("
    "'live', s.n_live_tup, 'dead', s.n_dead_tup, 'changed', s.n_mod_since_analyze,"
    " 'last_vacuum', s.last_vacuum, 'last_autovacuum', s.last_autovacuum,"
    " 'last_analyze', s.last_analyze, 'last_autoanalyze', s.last_autoanalyze,"
    " 'autovacuum', current_setting('autovacuum')::bool,"
    " 'table_hit', io.heap_blks_hit + coalesce(io.toast_blks_hit, 0),"
    " 'table_read', io.heap_blks_read + coalesce(io.toast_blks_read, 0),"
    " 'index_hit', coalesce(io.idx_blks_hit, 0) + coalesce(io.tidx_blks_hit, 0),"
    " 'index_read', coalesce(io.idx_blks_read, 0) + coalesce(io.tidx_blks_read, 0),"
    " 'xid', greatest(age(c.relfrozenxid), age(t.relfrozenxid)),"
    " 'mxid', greatest(mxid_age(c.relminmxid), mxid_age(t.relminmxid)),"
    " 'indexes', (SELECT coalesce(json_object_agg(ic.relname,"
    "  json_build_array(coalesce(si.idx_scan, 0), pg_relation_size(si.indexrelid))), '{}')"
    "  FROM pg_stat_all_indexes si JOIN pg_class ic ON ic.oid = si.indexrelid WHERE si.relid = c.oid))"
    " FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid"
    " JOIN pg_statio_all_tables io ON io.relid = c.oid LEFT JOIN pg_class t ON t.oid = c.reltoastrelid"
    " WHERE c.oid = '%s'::regclass"
)


@dataclass(frozen=True)
class Group:
    """The shards of a table on one node, or (``node`` None) all its shards."""

    table: str
    node: str | None
    shards: list[citus.PlacementResult]

    def label(self, name: str) -> str:
        """How a finding names ``name`` (the table or one of its indexes) for this group."""
        return name if self.node is None else f"{name} on {self.node}"

    @property
    def where(self) -> str:
        if self.node is not None:
            return f"{count(len(self.shards), 'shard')} on {self.node}"
        nodes = len({shard.node for shard in self.shards})
        return f"summed over {count(len(self.shards), 'shard')} on {count(nodes, 'node')}"

    def values(self) -> list[dict[str, Any]]:
        return [shard.value for shard in self.shards if isinstance(shard.value, dict)]


def read(probe: Probe, key: str, command: str) -> dict[str, list[citus.PlacementResult]]:
    """``command`` (one JSON value, ``%s`` the shard's name) on every placement of each
    sharded table, read once per doctor run under ``key``."""
    if key not in probe.cache:
        probe.cache[key] = {
            name: citus.on_placements(probe.connection, name, command)
            for name in probe.tables
            if name in probe.sharded
        }
    found: dict[str, list[citus.PlacementResult]] = probe.cache[key]
    return found


def groups(probe: Probe, table: str, results: list[citus.PlacementResult]) -> list[Group]:
    """The groups a table's shards are judged in: all of them (a distributed table), then
    each node's, in node order. Placements that could not be read are left out
    (``unread`` says so)."""
    read_ = [result for result in results if result.error is None]
    nodes = sorted({result.node for result in read_})
    found = []
    if probe.sharded.get(table) == citus.DISTRIBUTED:
        found.append(Group(table, None, read_))
    found += [Group(table, node, [r for r in read_ if r.node == node]) for node in nodes]
    return found


def unread(area: str, results: dict[str, list[citus.PlacementResult]]) -> list[Finding]:
    """A skipped finding for each placement a worker could not read."""
    return [
        Finding(
            area,
            f"{result.table} on {result.node}",
            "shard",
            SKIPPED,
            detail=f"shard {result.table}_{result.shard} could not be read: {result.error}",
            node=result.node,
        )
        for placements in results.values()
        for result in placements
        if result.error is not None
    ]


def index_name(name: str, shard: int) -> str:
    """A shard's index by the coordinator's name (the shard's carries ``_<shardid>``)."""
    return re.sub(rf"_{shard}$", "", name)


def timestamp(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def stalest(values: list[dict[str, Any]], manual: str, automatic: str) -> tuple[Any, Any]:
    """(manual, automatic) times of the shard whose latest of the two is the oldest, a
    shard never done first: the last time that every shard was done."""

    def latest(value: dict[str, Any]) -> dt.datetime | None:
        times = [t for t in (timestamp(value[manual]), timestamp(value[automatic])) if t]
        return max(times, default=None)

    if not values:
        return None, None
    oldest = min(
        values, key=lambda v: (latest(v) is not None, latest(v) or dt.datetime.min.replace(tzinfo=dt.UTC))
    )
    return timestamp(oldest[manual]), timestamp(oldest[automatic])


def only_coordinator(area: str, what: str) -> Finding:
    """Said once on a cluster by a check that reads the coordinator's server alone."""
    return Finding(
        area,
        "workers",
        area,
        SKIPPED,
        detail=f"on Citus this reads the coordinator's {what}; each worker has its own, not read here",
    )
