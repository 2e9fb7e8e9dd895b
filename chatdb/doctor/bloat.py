"""Bloat: space in chatdb's tables and indexes that holds no live row.

By default it is estimated from the statistics alone (pg_class's pages and rows, pg_stats'
column widths and null fractions, as of the last ANALYZE): no table is scanned. ``--deep``
measures it with pgstattuple, reading every page, where the extension is installed and the
role may use it (pg_stat_scan_tables, part of pg_monitor)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from chatdb.doctor import shards
from chatdb.doctor.model import OK, SKIPPED, WARN, Finding, size
from chatdb.doctor.probe import PRIVILEGE_HINT, Probe

#: PostgreSQL's page layout: page header, a heap tuple's header, an index tuple's header, a
#: line pointer, B-tree's special space; and its leaf pages' default fillfactor.
PAGE_HEADER = 24
HEAP_TUPLE_HEADER = 23
INDEX_TUPLE_HEADER = 8
LINE_POINTER = 4
BTREE_SPECIAL = 16
BTREE_FILLFACTOR = 90
MAXALIGN = 8
#: The width assumed for an index expression that has no statistics of its own.
EXPRESSION_WIDTH = 8


def _align(width: float) -> int:
    return math.ceil(width / MAXALIGN) * MAXALIGN


@dataclass(frozen=True)
class Measure:
    """One relation's wasted space: measured (deep) or estimated."""

    table: str
    index: str | None
    size: int  # bytes, as of the measurement
    wasted: int | None  # None: cannot be estimated (no statistics yet)
    how: str  # how it was measured, for the detail
    node: str | None = None  # on Citus: the node whose shards these are (None: all of them)
    shards: str = ""  # on Citus: which shards, for the detail


_TABLES = """
SELECT c.relname, c.relpages::bigint AS pages, pg_relation_size(c.oid) AS bytes, c.reltuples,
       current_setting('block_size')::int AS block,
       coalesce((SELECT o.option_value::int FROM pg_options_to_table(c.reloptions) o
                 WHERE o.option_name = 'fillfactor'), 100) AS fillfactor,
       count(a.attnum) AS columns, count(s.attname) AS analyzed,
       coalesce(sum((1 - s.null_frac) * s.avg_width), 0) AS width,
       coalesce(bool_or(s.null_frac > 0), false) AS nulls
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_stats s ON s.schemaname = current_schema() AND s.tablename = c.relname AND s.attname = a.attname
WHERE c.oid = ANY(:oids)
GROUP BY c.oid
"""

_INDEXES = """
SELECT t.relname AS table, c.relname AS index_name, c.oid, c.relpages::bigint AS pages, c.reltuples,
       pg_relation_size(c.oid) AS bytes,
       current_setting('block_size')::int AS block,
       coalesce((SELECT o.option_value::int FROM pg_options_to_table(c.reloptions) o
                 WHERE o.option_name = 'fillfactor'), :btree_fill) AS fillfactor,
       (SELECT coalesce(sum(coalesce((1 - s.null_frac) * s.avg_width, :expression)), 0)
        FROM generate_series(1, i.indnatts::int) AS n
        LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[n - 1] AND a.attnum > 0
        LEFT JOIN pg_attribute e ON e.attrelid = i.indexrelid AND e.attnum = n
        LEFT JOIN pg_stats s ON s.schemaname = current_schema()
             AND ((a.attnum IS NOT NULL AND s.tablename = t.relname AND s.attname = a.attname)
               OR (a.attnum IS NULL AND s.tablename = c.relname AND s.attname = e.attname))
       ) AS width,
       EXISTS (SELECT FROM pg_stats s WHERE s.schemaname = current_schema() AND s.tablename = t.relname)
         AS analyzed,
       i.indisvalid AS valid
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_am am ON am.oid = c.relam
WHERE i.indrelid = ANY(:oids) AND am.amname = 'btree'
ORDER BY t.relname, c.relname
"""


def _on_shards(query: str) -> str:
    """``query`` for one shard placement (``%s``, its name), its rows as a JSON array."""
    one = query.replace("ANY(:oids)", "'%s'::regclass").replace(":btree_fill", str(BTREE_FILLFACTOR))
    return f"SELECT coalesce(json_agg(x), '[]') FROM ({one.replace(':expression', str(EXPRESSION_WIDTH))}) x"


def _table_estimates(probe: Probe) -> list[Measure]:
    return _table_measures(probe.rows(_TABLES, oids=probe.oids))


def _table_measures(rows: Sequence[Any]) -> list[Measure]:
    found = []
    for row in rows:
        size_ = int(row.pages) * row.block
        if row.bytes == 0:
            found.append(Measure(row.relname, None, 0, 0, "empty"))
            continue
        if row.reltuples < 0 or row.analyzed < row.columns:
            found.append(Measure(row.relname, None, size_, None, "never analyzed"))
            continue
        bitmap = math.ceil(row.columns / 8) if row.nulls else 0
        tuple_size = _align(HEAP_TUPLE_HEADER + bitmap) + _align(float(row.width)) + LINE_POINTER
        per_page = max(1, math.floor((row.block - PAGE_HEADER) * row.fillfactor / 100 / tuple_size))
        expected = math.ceil(row.reltuples / per_page) * row.block
        found.append(Measure(row.relname, None, size_, max(0, size_ - expected), "estimated"))
    return found


def _index_estimates(probe: Probe) -> list[Measure]:
    rows = probe.rows(_INDEXES, oids=probe.oids, btree_fill=BTREE_FILLFACTOR, expression=EXPRESSION_WIDTH)
    return _index_measures(rows)


def _index_measures(rows: Sequence[Any]) -> list[Measure]:
    found = []
    for row in rows:
        size_ = int(row.pages) * row.block
        if row.valid and row.bytes <= row.block:  # the metapage alone
            found.append(Measure(row.table, row.index_name, int(row.bytes), 0, "empty"))
            continue
        if row.reltuples < 0 or not row.analyzed or not row.valid:
            found.append(
                Measure(row.table, row.index_name, size_, None, "never analyzed" if row.valid else "invalid")
            )
            continue
        tuple_size = _align(INDEX_TUPLE_HEADER + float(row.width)) + LINE_POINTER
        usable = (row.block - PAGE_HEADER - BTREE_SPECIAL) * row.fillfactor / 100
        per_page = max(1, math.floor(usable / tuple_size))
        leaves = math.ceil(row.reltuples / per_page)
        expected = (leaves + 1 + math.ceil(leaves / per_page)) * row.block  # leaves, meta, inner
        found.append(Measure(row.table, row.index_name, size_, max(0, size_ - expected), "estimated"))
    return found


def _deep(probe: Probe) -> tuple[list[Measure], str | None]:
    """Measured with pgstattuple; the reason when it cannot be."""
    tuple_stats = probe.function("pgstattuple", "pgstattuple")
    index_stats = probe.function("pgstattuple", "pgstatindex")
    if tuple_stats is None or index_stats is None:
        return [], (
            "--deep cannot measure bloat: pgstattuple is not installed in this database "
            "(CREATE EXTENSION pgstattuple; as its owner or a superuser); estimated instead"
        )
    if not probe.scan_tables:
        return [], (
            f"--deep cannot measure bloat: role {probe.user} may not run pgstattuple (it needs "
            f"pg_stat_scan_tables, part of pg_monitor; {PRIVILEGE_HINT}); estimated instead"
        )
    block = int(probe.scalar("SELECT current_setting('block_size')::int"))
    found = []
    for name, oid in probe.tables.items():
        if name in probe.sharded:
            continue  # the coordinator's table is an empty shell
        row = probe.one(
            f"SELECT table_len, dead_tuple_len, free_space FROM {tuple_stats}(CAST(:oid AS oid)::regclass)",
            oid=oid,
        )
        fillfactor = probe.scalar(
            "SELECT coalesce((SELECT o.option_value::int FROM pg_class c,"
            " pg_options_to_table(c.reloptions) o WHERE c.oid = :oid AND o.option_name = 'fillfactor'), 100)",
            oid=oid,
        )
        reserved = int(row.table_len) * (100 - fillfactor) // 100
        wasted = max(0, int(row.dead_tuple_len) + int(row.free_space) - reserved)
        probe.read_bytes += int(row.table_len)
        found.append(Measure(name, None, int(row.table_len), wasted, "measured with pgstattuple"))
        indexes = probe.rows(
            "SELECT c.relname, c.oid, i.indisvalid,"
            f" coalesce((SELECT o.option_value::int FROM pg_options_to_table(c.reloptions) o"
            f"  WHERE o.option_name = 'fillfactor'), {BTREE_FILLFACTOR}) AS fillfactor"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
            " WHERE i.indrelid = :oid AND am.amname = 'btree' ORDER BY c.relname",
            oid=oid,
        )
        for index in indexes:
            if not index.indisvalid:
                found.append(Measure(name, index.relname, 0, None, "invalid"))
                continue
            stats = probe.one(
                "SELECT index_size, leaf_pages, empty_pages, deleted_pages, avg_leaf_density"
                f" FROM {index_stats}(CAST(:oid AS oid)::regclass)",
                oid=index.oid,
            )
            density = float(stats.avg_leaf_density)
            density = 0.0 if math.isnan(density) else density
            leaves = int(stats.leaf_pages)
            ideal = math.ceil(leaves * min(1.0, density / index.fillfactor))
            wasted = (leaves - ideal + int(stats.empty_pages) + int(stats.deleted_pages)) * block
            probe.read_bytes += int(stats.index_size)
            found.append(
                Measure(
                    name, index.relname, int(stats.index_size), max(0, wasted), "measured with pgstatindex"
                )
            )
    return found, None


def _sharded(probe: Probe) -> tuple[list[Measure], list[Finding]]:
    """On Citus: the estimates of each sharded table and its indexes from its shards'
    statistics, summed per group of shards (``shards.groups``)."""
    tables = shards.read(probe, "bloat tables", _on_shards(_TABLES))
    indexes = shards.read(probe, "bloat indexes", _on_shards(_INDEXES))
    by_shard: dict[tuple[str, int], list[Measure]] = {}
    for read, measure_rows in ((tables, _table_measures), (indexes, _index_measures)):
        for result in (result for results in read.values() for result in results):
            if result.error is None and isinstance(result.value, list):
                measured = measure_rows([SimpleNamespace(**row) for row in result.value])
                by_shard.setdefault((result.node, result.shard), []).extend(
                    Measure(
                        result.table,
                        None if m.index is None else shards.index_name(m.index, result.shard),
                        m.size,
                        m.wasted,
                        m.how,
                    )
                    for m in measured
                )
    found: list[Measure] = []
    for name, results in tables.items():
        for group in shards.groups(probe, name, results):
            summed: dict[str | None, list[Measure]] = {}
            for shard in group.shards:
                for measure in by_shard.get((shard.node, shard.shard), []):
                    summed.setdefault(measure.index, []).append(measure)
            for index, measures in summed.items():
                known = [m.wasted for m in measures if m.wasted is not None]
                hows = {m.how for m in measures}
                how = hows.pop() if len(hows) == 1 else "estimated"
                found.append(
                    Measure(
                        name,
                        index,
                        sum(m.size for m in measures),
                        sum(known) if known or how == "empty" else None,
                        how,
                        group.node,
                        group.where,
                    )
                )
    return found, shards.unread("bloat", tables) + shards.unread("bloat", indexes)


def bloat(probe: Probe) -> list[Finding]:
    found: list[Finding] = []
    measures: list[Measure] = []
    if probe.options.deep:
        measures, reason = _deep(probe)
        if reason:
            found.append(Finding("bloat", None, "pgstattuple", SKIPPED, detail=reason))
        elif probe.sharded:
            found.append(
                Finding(
                    "bloat",
                    None,
                    "pgstattuple",
                    SKIPPED,
                    detail="on Citus, --deep measures the coordinator's own tables only; those with "
                    f"shards ({', '.join(probe.sharded)}) are estimated from their shards' statistics",
                )
            )
    if not measures:
        measures = _table_estimates(probe) + _index_estimates(probe)
    if probe.sharded:
        sharded, unread = _sharded(probe)
        found += unread
        measures = [m for m in measures if m.table not in probe.sharded] + sharded
    order = {name: n for n, name in enumerate(probe.tables)}
    measures.sort(
        key=lambda m: (order.get(m.table, len(order)), m.index is not None, m.index or "", m.node or "")
    )
    for measure in measures:
        found.append(_judge(probe, measure))
    return found


def _judge(probe: Probe, measure: Measure) -> Finding:
    limits = probe.thresholds
    name = measure.index or measure.table
    if measure.node is not None:
        name = f"{name} on {measure.node}"
    shards_ = f"; {measure.shards}" if measure.shards else ""
    check = "index bloat" if measure.index else "table bloat"
    limit = max(limits.bloat_bytes, math.ceil(limits.bloat_ratio * measure.size))
    where = f" of {measure.table}" if measure.index else ""
    if measure.wasted is None:
        reason = (
            "invalid: verify-indexes reports it"
            if measure.how == "invalid"
            else "no estimate: never analyzed (the vacuum area says so)"
        )
        return Finding(
            "bloat",
            name,
            check,
            OK,
            None,
            limit,
            f"{size(measure.size)}{where}; {reason}{shards_}",
            unit="bytes",
            node=measure.node,
        )
    if measure.how == "empty":
        return Finding(
            "bloat", name, check, OK, 0, limit, f"empty{where}{shards_}", unit="bytes", node=measure.node
        )
    share = f"{measure.wasted / measure.size:.0%}" if measure.size else "0%"
    detail = (
        f"{size(measure.wasted)} of {size(measure.size)}{where} ({share}) holds no live row ({measure.how})"
        + shards_
    )
    if measure.wasted < limit:
        return Finding(
            "bloat", name, check, OK, measure.wasted, limit, detail, unit="bytes", node=measure.node
        )
    if measure.index:
        fix = (
            f"REINDEX INDEX CONCURRENTLY {probe.quote(measure.index)};  -- builds it anew beside the old one;"
            " blocks neither reads nor writes"
        )
    elif measure.table in probe.sharded:
        fix = (
            f"-- on Citus, pg_repack runs on each worker, for each shard of {measure.table} there\n"
            "-- (citus_shards lists them): through the coordinator it would see an empty table"
        )
    else:
        table = f"{probe.schema}.{measure.table}"
        fix = (
            "-- pg_repack rewrites the table online, holding an ACCESS EXCLUSIVE lock only for a moment at\n"
            "-- its start and end. It must be installed: its extension in this database (CREATE EXTENSION\n"
            "-- pg_repack) and its client program, of the same version. Then, from a shell:\n"
            f"--   pg_repack --no-order --table={table} --dbname={probe.database}"
        )
    return Finding(
        "bloat",
        name,
        check,
        WARN,
        measure.wasted,
        limit,
        detail + "; VACUUM makes the space reusable but does not give it back",
        fix,
        "bytes",
        measure.node,
    )
