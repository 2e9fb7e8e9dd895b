"""``verify-indexes`` on a Citus coordinator: each table chatdb distributes is
distributed by ``user_id`` and co-located, and every shard placement has exactly the
indexes of the coordinator's table, each valid (docs/architecture.md, "Running on
Citus"). ``chatdb.indexes`` runs these checks when ``citus.cluster()`` finds a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection

from chatdb import citus
from chatdb.identifiers import quote
from chatdb.index_facts import Declared, ForeignKey
from chatdb.index_report import DISTRIBUTION, FAIL, OK, SHARDS, Check
from chatdb.schema import DISTRIBUTED_TABLES, DISTRIBUTION_COLUMN, add_constraint_sql


def shard_checks(
    connection: Connection,
    layout: citus.Cluster,
    oids: dict[str, int],
    declared: list[Declared],
    foreign_keys: list[ForeignKey],
) -> Iterator[Check]:
    """Each table chatdb distributes is distributed by user_id and co-located, with the
    foreign keys between them, and every shard placement has exactly the indexes of the
    coordinator's table (which the checks above hold to chatdb/schema.py), each valid."""
    group = None
    for table in (table.name for table in DISTRIBUTED_TABLES if table.name in oids):
        entry = layout.tables.get(table)
        if entry is None or entry.kind != citus.DISTRIBUTED or entry.column != DISTRIBUTION_COLUMN:
            state = f"distributed by {entry.column}" if entry and entry.column else "not distributed"
            yield Check(
                table,
                None,
                DISTRIBUTION,
                FAIL,
                f"{state} on this Citus cluster; chatdb distributes it by {DISTRIBUTION_COLUMN}",
                citus.redistribute_sql(table) if entry and entry.column else "chatdb migrate",
            )
            continue
        if group is not None and entry.colocation != group:
            yield Check(
                table,
                None,
                DISTRIBUTION,
                FAIL,
                f"not co-located with {DISTRIBUTED_TABLES[0].name}: a user's rows are on several nodes",
                citus.colocate_sql(table),
            )
            continue
        group = entry.colocation
        yield Check(table, None, DISTRIBUTION, OK, f"distributed by {DISTRIBUTION_COLUMN}, co-located")
        # Citus runs an index's DDL on the coordinator on every shard too; IF EXISTS on
        # each shard, where the index may be missing.
        fixes = {
            item.name: f"{item.drop.replace('CONCURRENTLY ', 'CONCURRENTLY IF EXISTS ')}\n{item.create}"
            for item in declared
            if item.table == table
        }
        yield from _placement_checks(
            table, citus.index_definitions(connection, table), citus.shard_indexes(connection, table), fixes
        )
    yield from _key_checks(oids, foreign_keys)


def _key_checks(oids: dict[str, int], foreign_keys: list[ForeignKey]) -> Iterator[Check]:
    """The foreign keys between the distributed tables. Citus keeps one only between
    co-located tables, so whoever distributes a table otherwise, or makes it local again,
    drops it first, and nothing puts it back when the table is distributed again."""
    present = {(key.table, key.name) for key in foreign_keys}
    for key in citus.owner_keys():
        table, parent, name = key.table.name, key.referred_table.name, str(key.name)
        if table not in oids or parent not in oids:
            continue
        if (table, name) in present:
            yield Check(table, name, DISTRIBUTION, OK, f"foreign key to {parent}: present")
        else:
            yield Check(
                table,
                name,
                DISTRIBUTION,
                FAIL,
                f"foreign key to {parent} is missing: nothing holds a message to its conversation",
                f"{add_constraint_sql(key)};",
            )


def _placement_checks(
    table: str, coordinator: dict[str, str], placements: list[citus.ShardIndexes], fixes: dict[str, str]
) -> Iterator[Check]:
    unread = [placement for placement in placements if placement.error is not None]
    for placement in unread:
        yield Check(table, None, SHARDS, FAIL, f"{placement.where} could not be read: {placement.error}")
    readable = [placement for placement in placements if placement.error is None]
    for name, definition in sorted(coordinator.items()):
        problems = []
        for placement in readable:
            found = placement.indexes.get(name)
            if found is None:
                problems.append(f"missing on {placement.where}")
            elif found[0] != definition:
                problems.append(f"on {placement.where} it is {found[0]}")
            elif not found[1]:
                problems.append(f"invalid on {placement.where}")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            yield Check(
                table,
                name,
                SHARDS,
                FAIL,
                f"{problems[0]}{more}",
                fixes.get(name, "-- on the coordinator, drop the index and create it again"),
            )
        else:
            yield Check(
                table, name, SHARDS, OK, f"on all {len(readable)} shard placements, as on the coordinator"
            )
    for placement in readable:
        for name in sorted(placement.indexes.keys() - coordinator.keys()):
            yield Check(
                table,
                name,
                SHARDS,
                FAIL,
                f"on {placement.where} only, not on the coordinator's table",
                f"-- on {placement.node}: DROP INDEX CONCURRENTLY {quote(f'{name}_{placement.shard}')};",
            )
