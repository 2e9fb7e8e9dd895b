"""status, bench's clean-up, and errors on the cluster: sizes and placements from the
shards, and a statement Citus refuses because of how the tables are distributed is said
to be that, never a lock."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy.exc import DBAPIError

from chatdb import citus
from chatdb.schema import DISTRIBUTED_TABLES

SIZES = ("--users", "10", "--conversations", "80", "--messages", "900")
#: What archive and purge say when Citus refuses their batch's ``FOR UPDATE`` (a router
#: query, which the database's settings forbid here).
REFUSED = (
    "Citus cannot run this on the distributed tables: could not run distributed query with"
    " FOR UPDATE/SHARE commands HINT: Consider using an equality filter on the distributed"
    " table's partition column."
)


def run(cli, *args: str):
    result = cli(*args)
    assert "Traceback" not in result.output
    return result


def test_status_shows_the_sizes_of_the_shards_and_where_they_are(citus_migrated_db, cli):
    assert run(cli, "seed", *SIZES, "--database-url", citus_migrated_db.cli_url).exit_code == 0
    citus_migrated_db.execute("ANALYZE")
    result = run(cli, "status", "--json", "--database-url", citus_migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    tables = {t["name"]: t for t in payload["tables"]}
    assert (tables["messages"]["rows"], tables["conversations"]["rows"]) == (900, 80)
    placements = payload["placements"]
    for table in (t.name for t in DISTRIBUTED_TABLES):
        mine = [p for p in placements if p["table"] == table]
        # Eight shards over the two workers, and the table's size is theirs.
        assert sorted(p["shards"] for p in mine) == [4, 4], mine
        assert len({p["node"] for p in mine}) == 2
        assert tables[table]["total_bytes"] == sum(p["total_bytes"] for p in mine)
    assert len([p for p in placements if p["table"] == "users"]) == 3  # a copy on every node
    # chatdb_runs, a Citus local table, is one shard on the coordinator.
    coordinator = f"localhost:{citus_migrated_db.cluster.coordinator.port}"
    assert [(p["node"], p["shards"]) for p in placements if p["table"] == "chatdb_runs"] == [(coordinator, 1)]
    assert not [p for p in placements if p["table"] == "chatdb_size_history"]
    # The size history (doctor's growth) records the shards' sizes too.
    recorded = citus_migrated_db.scalar(
        "SELECT total_bytes FROM chatdb_size_history WHERE table_name = 'messages' ORDER BY id DESC LIMIT 1"
    )
    assert recorded == tables["messages"]["total_bytes"]
    text = run(cli, "status", "--database-url", citus_migrated_db.cli_url)
    assert "Shards on Citus" in text.stdout


def test_a_statement_citus_refuses_is_a_distribution_error(citus_migrated_db):
    with citus_migrated_db.engine.connect() as connection, pytest.raises(DBAPIError) as raised:
        connection.exec_driver_sql("SELECT id FROM conversations FOR UPDATE")
    error = citus.distribution_error(raised.value)
    assert error is not None
    assert error.message == (
        "Citus cannot run this on the distributed tables: could not run distributed query with"
        " FOR UPDATE/SHARE commands HINT: Consider using an equality filter on the distributed"
        " table's partition column."
    )
    assert "not a lock" in (error.hint or "")


def test_a_statement_citus_refuses_reaches_the_user_as_one_error_line_and_exit_1(citus_migrated_db, cli):
    """The whole way to the user: an operator turned Citus's router execution off for the
    database, so a batch's ``FOR UPDATE`` of one user's rows, planned over every shard, is
    one Citus refuses. chatdb says that, in one line with Citus's own message and exit 1:
    not a lock, not the data, no traceback; the run is recorded as failed, nothing moved."""
    db = citus_migrated_db
    assert run(cli, "seed", *SIZES, "--database-url", db.cli_url).exit_code == 0
    db.execute(f"ALTER DATABASE {db.name} SET citus.enable_router_execution TO off")
    command = [sys.executable, "-m", "chatdb", "archive", "--older-than", "60d", "--yes"]
    shown = subprocess.run(
        [*command, "--database-url", db.cli_url], capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
    assert shown.stdout == ""
    assert shown.stderr.splitlines() == [
        f"error: {REFUSED}",
        "hint: a limit of how the tables are distributed, not a lock or the data:"
        ' see README.md, "Running on Citus"',
    ]
    as_json = subprocess.run(
        [*command, "--json", "--database-url", db.cli_url], capture_output=True, text=True, timeout=300
    )
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    payload = json.loads(as_json.stdout)
    assert (payload["ok"], payload["exit_code"], payload["error"]) == (False, 1, REFUSED)
    assert db.scalar("SELECT count(*) FROM conversations_archive") == 0
    assert db.scalar("SELECT array_agg(DISTINCT outcome) FROM chatdb_runs") == ["failed"]


def test_bench_cleans_up_on_the_cluster(citus_migrated_db, cli):
    """bench's clean-up deletes its users (the reference table) after counting their rows
    in the distributed tables, in one transaction."""
    citus_migrated_db.execute(
        "INSERT INTO users (id) VALUES ('bench-0000aaaa-0');"
        " INSERT INTO conversations (user_id) VALUES ('bench-0000aaaa-0')"
    )
    result = run(cli, "bench", "--cleanup", "--database-url", citus_migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    assert citus_migrated_db.scalar("SELECT count(*) FROM users") == 0
