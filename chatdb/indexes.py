"""``chatdb verify-indexes``: every expected index exists, matches its declaration exactly,
is valid, and serves its query pattern.

The expectations are ``chatdb.schema``'s metadata: its indexes, primary keys and unique
constraints. The server normalises them itself: each chatdb table gets an empty
temporary copy (``LIKE``) inside a transaction that is rolled back, the declared indexes
are built on the copies, and the copies' catalog facts (key columns and expressions,
ASC/DESC and NULLS order, operator classes, collations, INCLUDE columns, predicate,
access method, uniqueness, the constraint an index enforces) are compared with the live
ones. Nothing is parsed from SQL text.

The query patterns of ``chatdb.patterns`` are run through ``EXPLAIN`` with sequential
scans, bitmap scans and sorts discouraged, in a transaction that is rolled back.

Nothing is changed and nothing persists: the only objects created are temporary tables
inside rolled-back transactions, no session setting outlives its transaction (so
PgBouncer in transaction mode is fine), and no query reads table data, so the cost does
not grow with the data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import replace

from sqlalchemy import Connection, Engine, text

from chatdb import citus, migrations, patterns
from chatdb.errors import StateError
from chatdb.index_facts import (
    Declared,
    ForeignKey,
    IndexFacts,
    declared_indexes,
    definition_differences,
    duplicate_of,
    expected_facts,
    listed,
    prefix_of,
    quote,
    read_foreign_keys,
    read_index_facts,
    table_oids,
)
from chatdb.index_report import (
    DEFINITION,
    DUPLICATE,
    FAIL,
    FOREIGN_KEY,
    OK,
    PRESENT,
    QUERY,
    REDUNDANT,
    REVISION,
    TABLE,
    UNEXPECTED,
    VALID,
    Check,
    VerifyReport,
)
from chatdb.index_shards import shard_checks
from chatdb.schema import CHATDB_TABLES

#: Planner settings for the query proof, each SET LOCAL in a rolled-back transaction.
PINNED_PLANNER = ("enable_seqscan", "enable_bitmapscan", "enable_sort")


# --- the checks -----------------------------------------------------------------------------


def verify_indexes(engine: Engine, *, allow_extra: bool = False) -> VerifyReport:
    """Run every check. A database behind head gets the revision finding alone (indexes
    checked against an older schema say little); one that chatdb never migrated, or that
    is at a revision this chatdb does not know, raises StateError."""
    started = time.perf_counter()
    state = migrations.status(engine)
    if not state.known:
        raise migrations.unknown_revision(state.current or "")
    if state.current is None:
        raise StateError("the database has no chatdb schema yet", hint="run `chatdb migrate` first")
    checks: list[Check] = []
    if state.pending:
        checks.append(
            Check(
                None,
                None,
                REVISION,
                FAIL,
                f"the database is at revision {state.current}, {len(state.pending)} behind head "
                f"{state.head}; indexes were not checked",
                "chatdb migrate",
            )
        )
        return VerifyReport(state.current, state.head, checks, time.perf_counter() - started)
    checks.append(Check(None, None, REVISION, OK, f"at head {state.head}"))
    declared = declared_indexes()
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            connection.execute(text("SET LOCAL lock_timeout = '5s'"))
            oids = table_oids(connection, [table.name for table in CHATDB_TABLES], temporary=False)
            live = read_index_facts(connection, oids.values())
            foreign_keys = read_foreign_keys(connection, oids.values())
            expected, unbuildable = expected_facts(connection, declared, oids)
        finally:
            transaction.rollback()
        checks.extend(_table_checks(declared, oids, live, expected, unbuildable, allow_extra, foreign_keys))
        layout = citus.cluster(connection)
        if layout is not None:
            checks.extend(shard_checks(connection, layout, oids, declared, foreign_keys))
        connection.rollback()
        checks.extend(_query_checks(connection, declared, oids, live, expected, on_citus=layout is not None))
    return VerifyReport(state.current, state.head, checks, time.perf_counter() - started)


def _table_checks(
    declared: list[Declared],
    oids: dict[str, int],
    live: dict[str, dict[str, IndexFacts]],
    expected: dict[str, dict[str, IndexFacts]],
    unbuildable: dict[str, str],
    allow_extra: bool,
    foreign_keys: list[ForeignKey],
) -> Iterator[Check]:
    by_name = {item.name: item for item in declared}
    for table in (table.name for table in CHATDB_TABLES):
        if table not in oids:
            yield Check(
                table,
                None,
                TABLE,
                FAIL,
                f"table {table} is missing although the revision is head",
                "restore it; `chatdb migrate sql` shows its definition",
            )
            continue
        yield Check(table, None, TABLE, OK, "exists")
        indexes = live.get(table, {})
        wanted = expected.get(table, {})
        for item in (item for item in declared if item.table == table):
            yield from _declared_checks(item, wanted.get(item.name), indexes.get(item.name), unbuildable)
        for name in sorted(indexes.keys() - {item.name for item in declared if item.table == table}):
            yield from _extra_checks(indexes[name], allow_extra)
        yield from _redundancy_checks(list(indexes.values()), set(wanted))
        for key in (key for key in foreign_keys if key.table == table):
            yield _foreign_key_check(key, list(indexes.values()), list(wanted.values()), by_name)


def _declared_checks(
    item: Declared, expected: IndexFacts | None, live: IndexFacts | None, unbuildable: dict[str, str]
) -> Iterator[Check]:
    table, name = item.table, item.name
    if live is None:
        yield Check(table, name, PRESENT, FAIL, "missing: declared in chatdb/schema.py", item.create)
        return
    yield Check(table, name, PRESENT, OK, "exists")
    if expected is None:
        yield Check(
            table,
            name,
            DEFINITION,
            FAIL,
            f"the declared index cannot be built on the live table's columns: {unbuildable.get(name)}",
            "compare the table with chatdb/schema.py (`chatdb migrate stamp` lists the differences)",
        )
    elif differences := definition_differences(expected, live):
        yield Check(
            table,
            name,
            DEFINITION,
            FAIL,
            "; ".join(differences),
            f"{item.drop}\n{item.create}",
        )
    else:
        yield Check(table, name, DEFINITION, OK, "matches chatdb/schema.py")
    yield _validity_check(live, f"{item.drop}\n{item.create}")


def _extra_checks(index: IndexFacts, allow_extra: bool) -> Iterator[Check]:
    drop = _drop(index)
    if allow_extra:
        yield Check(
            index.table, index.name, UNEXPECTED, OK, "not in chatdb/schema.py; accepted (--allow-extra)"
        )
    else:
        yield Check(
            index.table,
            index.name,
            UNEXPECTED,
            FAIL,
            f"not declared in chatdb/schema.py: {index.summary}",
            f"{drop}\n-- or declare it in chatdb/schema.py (with a migration), or pass --allow-extra",
        )
    yield _validity_check(index, drop)


def _drop(index: IndexFacts) -> str:
    if index.constraint_name is not None:
        return f"ALTER TABLE {quote(index.table)} DROP CONSTRAINT {quote(index.constraint_name)};"
    return f"DROP INDEX CONCURRENTLY {quote(index.name)};"


def _validity_check(index: IndexFacts, fix: str) -> Check:
    if index.valid and index.ready:
        return Check(index.table, index.name, VALID, OK, "valid and ready")
    state = "invalid and not ready" if not index.ready else "invalid"
    return Check(
        index.table,
        index.name,
        VALID,
        FAIL,
        f"{state}, as a failed CREATE INDEX CONCURRENTLY leaves it: queries cannot use it, "
        "writes still maintain it",
        fix,
    )


def _redundancy_checks(indexes: list[IndexFacts], expected: set[str]) -> Iterator[Check]:
    for index in sorted(indexes, key=lambda index: index.name):
        if not index.valid:
            continue  # the validity check already reports it
        twin = duplicate_of(index, indexes, expected)
        if twin is not None:
            yield Check(
                index.table,
                index.name,
                DUPLICATE,
                FAIL,
                f"exact duplicate of {twin.name}",
                _redundancy_fix(index, twin, expected),
            )
        else:
            yield Check(index.table, index.name, DUPLICATE, OK, "no other index has its definition")
        wider = None if twin is not None else prefix_of(index, indexes, expected)
        if wider is not None:
            yield Check(
                index.table,
                index.name,
                REDUNDANT,
                FAIL,
                f"left prefix of {wider.name} ({listed(wider.keys)}), which serves the same queries",
                _redundancy_fix(index, wider, expected),
            )
        elif twin is None:
            reason = (
                f"enforces {index.enforces}"
                if index.enforces
                else "unique"
                if index.unique
                else "no other index starts with its key columns"
            )
            yield Check(index.table, index.name, REDUNDANT, OK, reason)


def _redundancy_fix(index: IndexFacts, other: IndexFacts, expected: set[str]) -> str:
    if index.name in expected and other.name not in expected:
        # The declared index stays; the one that makes it redundant is what was added.
        return f"{_drop(other)}\n-- or declare {other.name} in chatdb/schema.py instead of {index.name}"
    if index.name in expected:
        return f"-- declare only one of {index.name} and {other.name} in chatdb/schema.py"
    return _drop(index)


def _foreign_key_check(
    key: ForeignKey, indexes: list[IndexFacts], wanted: list[IndexFacts], declared: dict[str, Declared]
) -> Check:
    first = key.columns[0]
    described = f"foreign key {key.name} ({', '.join(key.columns)}) -> {key.references}"
    for index in sorted(indexes, key=lambda index: (len(index.keys), index.name)):
        if _covers(index, first):
            return Check(key.table, index.name, FOREIGN_KEY, OK, f"{described}: covered")
    candidates = [index for index in wanted if _covers(index, first)]
    if candidates:
        cover = min(candidates, key=lambda index: (len(index.keys), index.name))
        name, fix = cover.name, declared[cover.name].create
        if any(index.name == name for index in indexes):
            fix = f"{declared[name].drop}\n{fix}"
    else:
        name = None
        fix = f"CREATE INDEX CONCURRENTLY ON {quote(key.table)} ({quote(first)});"
    return Check(
        key.table,
        name,
        FOREIGN_KEY,
        FAIL,
        f"{described}: no valid, non-partial index starts with {first} "
        f"(deleting from {key.references} scans {key.table})",
        fix,
    )


def _covers(index: IndexFacts, column: str) -> bool:
    return index.valid and index.predicate is None and bool(index.keys) and index.keys[0].column == column


# --- the query proof ------------------------------------------------------------------------


def _query_checks(
    connection: Connection,
    declared: list[Declared],
    oids: dict[str, int],
    live: dict[str, dict[str, IndexFacts]],
    expected: dict[str, dict[str, IndexFacts]],
    *,
    on_citus: bool = False,
) -> Iterator[Check]:
    table_of = {item.name: item.table for item in declared}
    by_name = {item.name: item for item in declared}
    transaction = connection.begin()
    try:
        connection.execute(
            text("SELECT set_config(name, 'off', true) FROM unnest(CAST(:names AS text[])) AS name"),
            {"names": list(PINNED_PLANNER)},
        )
        if on_citus:
            # The proof is the plan each shard runs: EXPLAIN shows every task's plan, and
            # the planner settings go to the workers too (Citus passes on SET LOCAL
            # statements, not set_config()).
            connection.execute(text("SET LOCAL citus.explain_all_tasks = on"))
            connection.execute(text("SET LOCAL citus.propagate_set_commands = 'local'"))
            for name in PINNED_PLANNER:
                connection.execute(text(f"SET LOCAL {name} = off"))
        for pattern in patterns.PATTERNS:
            table = table_of.get(pattern.index)
            if table is None or table not in oids:
                yield Check(
                    table,
                    pattern.index,
                    QUERY,
                    FAIL,
                    f"{pattern.name}: its table is missing" if table else f"{pattern.name}: undeclared index",
                )
                continue
            plan = explain(connection, pattern)
            tasks = list(_tasks(plan))
            if not tasks:
                nodes = list(_plan_nodes(plan))
                yield _query_check(
                    pattern, table, nodes, by_name[pattern.index], live.get(table, {}), expected
                )
                continue
            results = [
                (
                    node,
                    _query_check(
                        pattern, table, nodes, by_name[pattern.index], live.get(table, {}), expected
                    ),
                )
                for node, nodes in tasks
            ]
            failed = [(node, check) for node, check in results if check.failed]
            if failed:
                node, check = failed[0]
                where = f"on {len(failed)} of {len(results)} shards, such as one on {node}"
                yield replace(check, detail=f"{check.detail} ({where})")
            else:
                shards = "its user's shard" if len(results) == 1 else f"each of {len(results)} shards"
                yield replace(results[0][1], detail=f"{results[0][1].detail} on {shards}")
    finally:
        transaction.rollback()


def explain(connection: Connection, pattern: patterns.Pattern) -> dict:
    """The plan of a pattern's statement, with its sample values."""
    compiled = pattern.statement().compile(dialect=connection.dialect)
    raw = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    return raw[0]["Plan"]


def _plan_nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


_SHARD_SUFFIX = re.compile(r"_\d+$")


def _tasks(plan: dict) -> Iterator[tuple[str, list[dict]]]:
    """On Citus, each task's plan under the coordinator's Custom Scan, as (the worker, its
    nodes), index names without their shard's suffix."""
    for node in _plan_nodes(plan):
        for task in node.get("Distributed Query", {}).get("Job", {}).get("Tasks", []):
            worker = task.get("Node", "").replace("host=", "").replace(" port=", ":").split(" dbname")[0]
            for remote in task.get("Remote Plan", []):
                for entry in remote:
                    nodes = [dict(n) for n in _plan_nodes(entry["Plan"])]
                    for n in nodes:
                        if "Index Name" in n:
                            n["Index Name"] = _SHARD_SUFFIX.sub("", n["Index Name"])
                    yield worker, nodes


def _query_check(
    pattern: patterns.Pattern,
    table: str,
    nodes: list[dict],
    item: Declared,
    indexes: dict[str, IndexFacts],
    expected: dict[str, dict[str, IndexFacts]],
) -> Check:
    scans = [node for node in nodes if node["Node Type"] in ("Index Scan", "Index Only Scan")]
    mine = [node for node in scans if node.get("Index Name") == pattern.index]
    sorts = [node for node in nodes if "Sort" in node["Node Type"]]
    live = indexes.get(pattern.index)
    if live is None:
        fix = item.create
    elif not live.valid or definition_differences(expected[table][pattern.index], live):
        fix = f"{item.drop}\n{item.create}"
    else:
        fix = None
    if mine and not (pattern.ordered and sorts):
        backward = " (backward)" if mine[0].get("Scan Direction") == "Backward" else ""
        return Check(table, pattern.index, QUERY, OK, f"{pattern.name}: {mine[0]['Node Type']}{backward}")
    if mine:
        detail = f"{pattern.name}: uses {pattern.index} but sorts afterwards ({sorts[0]['Node Type']})"
    elif scans:
        others = ", ".join(sorted({node["Index Name"] for node in scans}))
        detail = f"{pattern.name}: planned with {others}, not {pattern.index}"
        fix = fix or f"-- {others} competes with {pattern.index}: see the other findings on {table}"
    else:
        plan = ", ".join(dict.fromkeys(node["Node Type"] for node in nodes))
        detail = f"{pattern.name}: no index serves it (plan: {plan})"
    return Check(table, pattern.index, QUERY, FAIL, detail, fix)
