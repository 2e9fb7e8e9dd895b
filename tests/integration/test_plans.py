"""Every statement chatdb runs stays linear in the rows it reads, whatever work_mem is.

The commands run against a small seeded database whose sessions have ``work_mem = 64kB``
(set on the database, so every session of every command has it). Each SELECT, INSERT,
UPDATE and DELETE they send goes through ``EXPLAIN`` first, in the same transaction
(inside a savepoint), and no plan may hold:

- a SubPlan, hashed or not, that scans one of chatdb's tables without an index: executed
  once per outer row, or hashed only while the rows fit in work_mem, it turns quadratic as
  the table grows (a purge count went from 0.8 s at 1M messages to hours at 10M this way);
- a nested loop whose inner side scans one of chatdb's tables without an index.

The catalog queries (status, verify-indexes, migrate) are explained too; the rules apply
to chatdb's tables, whose size grows with the data, not to the catalogs, whose size grows
with the number of objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from sqlalchemy import Engine, event

from chatdb import patterns
from chatdb.schema import metadata

DATA_TABLES = frozenset(metadata.tables) | {"users"}
_EXPLAINED = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")
_UNINDEXED_SCANS = {"Seq Scan", "Sample Scan", "Tid Range Scan"}


@dataclass
class Explained:
    statement: str
    plan: dict | None  # None: EXPLAIN refused the statement
    error: str | None = None


@contextmanager
def explained(database: str) -> Iterator[list[Explained]]:
    """Capture every statement any engine sends to ``database``, with its plan."""
    seen: list[Explained] = []

    def before(connection, cursor, statement, parameters, context, executemany):
        if executemany or connection.engine.url.database != database:
            return
        if statement.lstrip().split(None, 1)[0].upper() not in _EXPLAINED:
            return
        raw: psycopg.Connection = cursor.connection
        savepoint = not raw.autocommit
        with raw.cursor() as explain:
            if savepoint:
                explain.execute("SAVEPOINT chatdb_plan_check")
            try:
                explain.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
                seen.append(Explained(statement, explain.fetchone()[0][0]["Plan"]))
            except psycopg.Error as exc:
                seen.append(Explained(statement, None, str(exc)))
                if savepoint:
                    explain.execute("ROLLBACK TO SAVEPOINT chatdb_plan_check")
            if savepoint:
                explain.execute("RELEASE SAVEPOINT chatdb_plan_check")

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


def _nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


def _unindexed_scans(node: dict) -> list[str]:
    return [
        f"{n['Node Type']} on {n['Relation Name']}"
        for n in _nodes(node)
        if n["Node Type"] in _UNINDEXED_SCANS and n.get("Relation Name") in DATA_TABLES
    ]


def problems(plan: dict) -> list[str]:
    """What makes a plan grow faster than the rows it reads."""
    found = []
    for node in _nodes(plan):
        name = node.get("Subplan Name", "")
        if node.get("Parent Relationship") == "SubPlan" and not name.startswith(("InitPlan", "CTE")):
            found += [f"{name} over a {scan}" for scan in _unindexed_scans(node)]
        if node["Node Type"] == "Nested Loop":
            inner = node["Plans"][1]
            found += [f"nested loop with a {scan} on its inner side" for scan in _unindexed_scans(inner)]
    return found


def check(seen: list[Explained]) -> None:
    assert seen, "no statement was captured"
    refused = [e for e in seen if e.plan is None]
    assert not refused, "\n".join(f"{e.error}: {e.statement}" for e in refused)
    bad = [(e.statement, p) for e in seen for p in problems(e.plan)]
    assert not bad, "\n\n".join(f"{p}:\n{s}" for s, p in bad)


@pytest.fixture
def small_memory_db(migrated_db, cli):
    """A seeded database, with something in every table chatdb works on, whose sessions
    all have work_mem = 64kB."""
    url = migrated_db.cli_url
    assert cli("seed", "--database-url", url, "--users", "40", "--conversations", "400",
               "--messages", "6000", "--days", "400").exit_code == 0  # fmt: skip
    assert cli("archive", "--database-url", url, "--older-than", "200d", "--yes").exit_code == 0
    migrated_db.execute(
        "UPDATE conversations SET deleted_at = now() - interval '40 days' WHERE ctid IN"
        " (SELECT ctid FROM conversations TABLESAMPLE BERNOULLI (10) REPEATABLE (1))"
    )
    migrated_db.execute(
        "UPDATE messages SET deleted_at = now() - interval '40 days' WHERE ctid IN"
        " (SELECT ctid FROM messages TABLESAMPLE BERNOULLI (10) REPEATABLE (1))"
    )
    migrated_db.execute(f"ALTER DATABASE \"{migrated_db.name}\" SET work_mem = '64kB'")
    migrated_db.execute("ANALYZE")
    migrated_db.engine.dispose()
    return migrated_db


def test_plan_check_catches_a_subplan_over_a_scan(small_memory_db):
    """The check itself: the OR form of a purge's message count is refused."""
    with explained(small_memory_db.name) as seen:
        small_memory_db.scalar(
            "SELECT count(*) FROM messages WHERE deleted_at < now() OR conversation_id IN"
            " (SELECT id FROM conversations WHERE updated_at < now() - interval '90 days')"
        )
    assert problems(seen[0].plan)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["verify-indexes"],
        ["migrate", "status"],
        ["archive", "--older-than", "100d", "--dry-run"],
        ["purge", "--older-than", "150d", "--dry-run"],
        ["purge", "--older-than", "150d", "--yes"],
        ["archive", "--older-than", "100d", "--yes", "--export", "{tmp}/export.jsonl"],
        ["archive", "restore", "--user", "{user}"],
        ["migrate"],
        ["seed", "--reset", "--yes", "--users", "10", "--conversations", "50", "--messages", "500"],
    ],
    ids=" ".join,
)
def test_every_statement_of_a_command_stays_linear_at_64kb_work_mem(small_memory_db, cli, command, tmp_path):
    user = small_memory_db.scalar("SELECT min(user_id) FROM conversations_archive")
    args = [part.format(tmp=tmp_path, user=user) for part in command]
    with explained(small_memory_db.name) as seen:
        result = cli(*args, "--database-url", small_memory_db.cli_url)
    assert result.exit_code == 0, result.output
    check(seen)


def test_the_application_patterns_stay_linear_at_64kb_work_mem(small_memory_db):
    with explained(small_memory_db.name) as seen, small_memory_db.engine.connect() as connection:
        for pattern in patterns.PATTERNS:
            connection.execute(pattern.statement()).all()
        connection.rollback()
    check(seen)
