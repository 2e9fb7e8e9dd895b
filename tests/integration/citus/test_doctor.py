"""``chatdb doctor`` on the cluster: the statistics of the distributed tables are read on
their shards, per node and summed per table, never from the coordinator's empty shells;
the checks that read one server say so (README, "chatdb doctor" and "Running on Citus")."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from sqlalchemy import text

SEED = ("--users", "20", "--conversations", "200", "--messages", "2000", "--days", "365")
JUDGE = ("--threshold", "dead_rows=10", "--threshold", "dead_ratio=0.05")


def doctor(cli, database, *args: str) -> tuple[int, dict]:
    result = cli("doctor", "--json", *args, "--database-url", database.cli_url)
    assert "Traceback" not in result.output
    assert result.stdout.count("\n") == 1, result.output
    return result.exit_code, json.loads(result.stdout)


def found(payload: dict, area: str, check: str, obj: str) -> dict:
    (finding,) = [c for c in payload["checks"] if (c["area"], c["check"], c["object"]) == (area, check, obj)]
    return finding


def on_workers(database, sql: str) -> dict[str, int]:
    """``sql`` (one number) run on each worker by a connection of its own: the oracle."""
    assert database.cluster is not None
    found = {}
    for worker in database.cluster.workers:
        with psycopg.connect(worker.conninfo(database.name), autocommit=True) as connection:
            # Citus hides the shards from a worker's catalog for other clients than its own.
            connection.execute("SET citus.override_table_visibility = off")
            found[f"localhost:{worker.port}"] = int(connection.execute(sql).fetchone()[0] or 0)
    return found


#: The statistic of every shard of a table on this worker (by the shards' names).
SHARDS_OF = (
    "SELECT sum({what}) FROM pg_stat_all_tables s WHERE s.relid IN (SELECT c.oid FROM pg_class c"
    " WHERE c.relname ~ '^{table}_[0-9]+$' AND c.relkind = 'r')"
)


def wait_until(database, sql: str, expected: int) -> dict[str, int]:
    """The workers' statistics reach other sessions once the sessions that changed them
    report (at the latest when they exit): wait for them to add up to ``expected``."""
    deadline = time.monotonic() + 60
    while True:
        counts = on_workers(database, sql)
        if sum(counts.values()) == expected:
            return counts
        assert time.monotonic() < deadline, f"the workers' statistics never added up to {expected}: {counts}"
        time.sleep(0.1)


@pytest.fixture
def seeded(citus_migrated_db, cli):
    result = cli("seed", *SEED, "--database-url", citus_migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    citus_migrated_db.execute("ANALYZE")
    return citus_migrated_db


def test_dead_rows_are_the_shards_per_node_and_summed_per_table(seeded, cli):
    # Propagated to every shard: no autovacuum takes the dead rows away during the test.
    seeded.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    deleted = seeded.scalar("SELECT count(*) FROM messages WHERE user_id IN (SELECT id FROM users LIMIT 8)")
    assert deleted > 100
    seeded.execute("DELETE FROM messages WHERE user_id IN (SELECT id FROM users LIMIT 8)")
    seeded.engine.dispose()  # the coordinator's sessions end, and their connections to the workers
    per_node = wait_until(seeded, SHARDS_OF.format(what="n_dead_tup", table="messages"), deleted)
    assert len([n for n in per_node.values() if n]) == 2, per_node  # eight users land on both workers

    code, payload = doctor(cli, seeded, *JUDGE)
    assert code == 0, payload
    total = found(payload, "vacuum", "dead rows", "messages")
    assert (total["status"], total["value"], total["node"]) == ("warn", deleted, None)
    assert "summed over 8 shards on 2 nodes" in total["detail"]
    assert total["fix"].startswith("VACUUM (ANALYZE) messages;")
    for node, dead in per_node.items():
        finding = found(payload, "vacuum", "dead rows", f"messages on {node}")
        assert (finding["value"], finding["node"]) == (dead, node)
        assert f"4 shards on {node}" in finding["detail"]
    # The coordinator's own table of messages is an empty shell: it never saw a row.
    assert (
        seeded.scalar("SELECT n_dead_tup + n_live_tup FROM pg_stat_all_tables WHERE relname = 'messages'")
        == 0
    )

    human = cli("doctor", *JUDGE, "--database-url", seeded.cli_url)
    assert "Traceback" not in human.output
    for node in per_node:
        assert f"messages on {node}" in human.stdout


def test_index_use_counts_the_scans_of_the_shards(seeded, cli):
    user = seeded.scalar("SELECT user_id FROM conversations ORDER BY id LIMIT 1")
    with seeded.engine.begin() as connection:
        # A user's recent conversations: a router query, its index scanned on one shard
        # (the planner settings passed on to the worker, as verify-indexes does).
        connection.execute(text("SET LOCAL citus.propagate_set_commands = 'local'"))
        connection.execute(text("SET LOCAL enable_seqscan = off"))
        for _ in range(5):
            connection.execute(
                text(
                    "SELECT id FROM conversations WHERE user_id = :user AND status = 'active'"
                    " ORDER BY updated_at DESC LIMIT 20"
                ),
                {"user": user},
            )
    seeded.engine.dispose()
    index = "idx_conversations_user_status_updated"
    scans = wait_until(
        seeded,
        f"SELECT sum(idx_scan) FROM pg_stat_all_indexes WHERE indexrelname ~ '^{index}_[0-9]+$'",
        5,
    )
    _, payload = doctor(cli, seeded)
    total = found(payload, "indexes", "index use", index)
    assert (total["status"], total["value"]) == ("ok", 5)
    assert sorted(
        found(payload, "indexes", "index use", f"{index} on {node}")["value"] for node in scans
    ) == [
        0,
        5,
    ]
    # The shell's index on the coordinator was never scanned.
    assert seeded.scalar(f"SELECT idx_scan FROM pg_stat_all_indexes WHERE indexrelname = '{index}'") == 0


def test_sizes_ages_and_cache_come_from_each_node(seeded, cli):
    _, payload = doctor(cli, seeded)
    nodes = [f"localhost:{worker.port}" for worker in seeded.cluster.workers]
    for table in ("conversations", "messages"):
        # Estimated from the shards' pages and statistics (the coordinator's table is empty).
        total = found(payload, "bloat", "table bloat", table)
        parts = [found(payload, "bloat", "table bloat", f"{table} on {node}") for node in nodes]
        assert total["value"] == sum(part["value"] for part in parts)
        assert "holds no live row (estimated); summed over 8 shards on 2 nodes" in total["detail"]
        assert all("holds no live row (estimated); 4 shards on" in part["detail"] for part in parts)
        for check in ("transaction id age", "multixact age"):
            per_node = [found(payload, "wraparound", check, f"{table} on {node}") for node in nodes]
            assert found(payload, "wraparound", check, table)["value"] == max(f["value"] for f in per_node)
        blocks = [found(payload, "cache", "table cache hit", f"{table} on {node}") for node in nodes]
        assert all(f["node"] in nodes for f in blocks)
    for node in nodes:
        assert found(payload, "wraparound", "transaction id age", f"{seeded.name} on {node}")["value"] > 0
        assert found(payload, "connections", "in use", f"server {node}")["value"] >= 1


def test_checks_of_one_server_say_so_on_a_cluster(seeded, cli):
    seeded.execute("CREATE EXTENSION amcheck; CREATE EXTENSION pgstattuple")
    _, payload = doctor(cli, seeded, "--deep")
    skipped = {(c["area"], c["object"]): c["detail"] for c in payload["checks"] if c["status"] == "skipped"}
    assert "coordinator's sessions" in skipped[("connections", "workers")]
    assert "coordinator's replication slots" in skipped[("replication", "workers")]
    assert "empty shells" in skipped[("integrity", "shards")]
    assert "on Citus, --deep measures the coordinator's own tables only" in skipped[("bloat", None)]
    measured = {c["object"]: c["detail"] for c in payload["checks"] if c["check"] == "table bloat"}
    assert "(measured with pgstattuple)" in measured["chatdb_runs"] or "empty" in measured["chatdb_runs"]
    assert "summed over 8 shards on 2 nodes" in measured["messages"]
    checked = {c["object"] for c in payload["checks"] if c["area"] == "integrity" and c["status"] == "ok"}
    assert "chatdb_runs_pkey" in checked and "messages_pkey" not in checked


def test_retention_estimates_are_the_shards_and_near_the_exact_counts(seeded, cli):
    _, estimated = doctor(cli, seeded, "--older-than", "30d")
    _, exact = doctor(cli, seeded, "--older-than", "30d", "--deep")
    for label in ("archive --older-than 30d", "purge --older-than 30d"):
        guess = found(estimated, "retention", "outlook", label)
        count = found(exact, "retention", "outlook", label)
        assert count["value"] > 50
        # The coordinator's plan of a distributed query says 100,000 rows whatever it reads.
        assert 0.5 * count["value"] <= guess["value"] <= 1.5 * count["value"], (guess, count)
        messages = [
            int(part.split()[0].lstrip("~").replace(",", ""))
            for part in (guess["detail"].split(", ")[1], count["detail"].split(", ")[1])
        ]
        assert 0.5 * messages[1] <= messages[0] <= 1.5 * messages[1], messages
