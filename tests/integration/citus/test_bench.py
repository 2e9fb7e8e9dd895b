"""``chatdb bench`` on the cluster: every statement it sends for a user is a router query
(Citus's plan has one task: one shard of one node), as the application's must be, and a
run goes through with its rows removed (README, "Running on Citus")."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import text

from chatdb import patterns
from chatdb.bench import runner, workload

SEED = ("--users", "20", "--conversations", "120", "--messages", "1500")


def tasks(connection, sql: str) -> int:
    """How many tasks (shard queries) Citus plans for ``sql``."""
    node = connection.execute(text(f"EXPLAIN (FORMAT JSON) {sql.rstrip(';')}")).scalar_one()[0]["Plan"]
    while "Distributed Query" not in node:  # under the coordinator's Limit and merge Sort
        (node,) = node["Plans"]
    return int(node["Distributed Query"]["Job"]["Task Count"])


@pytest.fixture
def seeded(citus_migrated_db, cli):
    result = cli("seed", *SEED, "--database-url", citus_migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    citus_migrated_db.execute("ANALYZE")
    return citus_migrated_db


def test_every_statement_bench_sends_for_a_user_goes_to_one_shard(seeded):
    with seeded.engine.connect() as connection:
        sample = workload.sample_keys(connection, 1500, size=20)
        assert len(sample) == 20 and len({key["user_id"] for key in sample}) > 1
        keys = workload.Keys("0badcafe", sample)
        for name, pattern in workload.WORKLOADS.items():
            if pattern.writes:
                continue
            for chosen in sample[:5]:
                for statement in pattern.statements(dataclasses.replace(keys, chosen=chosen)):
                    sql = workload.compile_sql(statement)
                    assert tasks(connection, sql) == 1, (name, sql)
        # Without the user_id, a conversation's history and a message by id are asked of
        # every shard: what bench sent before, and what the application must not do.
        key = sample[0]
        for statement in (
            patterns.conversation_history(key["conversation_id"], 50),
            patterns.message_by_id(key["id"]),
        ):
            assert tasks(connection, workload.compile_sql(statement)) == 8
        # The write: a message and its conversation's bump, each on the user's shard.
        add, bump = patterns.add_message_statements(key["conversation_id"], key["user_id"], "user", "hi")
        assert [tasks(connection, workload.compile_sql(s)) for s in (add, bump)] == [1, 1]
        # And the application's other patterns for one user.
        for statement in (
            patterns.recent_conversations(key["user_id"]),
            patterns.user_messages(key["user_id"]),
        ):
            assert tasks(connection, workload.compile_sql(statement)) == 1


def test_the_sample_is_of_real_messages_and_the_scripts_hold_them_as_literals(seeded, tmp_path):
    with seeded.engine.connect() as connection:
        sample = workload.sample_keys(connection, 1500, size=50)
        assert len({key["id"] for key in sample}) == 50
        found = connection.execute(
            text(
                "SELECT count(*) FROM messages WHERE (id, conversation_id, user_id) IN (SELECT * FROM"
                " unnest(CAST(:ids AS uuid[]), CAST(:conversations AS uuid[]), CAST(:users AS text[])))"
            ),
            {
                "ids": [key["id"] for key in sample],
                "conversations": [key["conversation_id"] for key in sample],
                "users": [key["user_id"] for key in sample],
            },
        ).scalar_one()
        assert found == 50
    script = workload.WORKLOADS["history"].script(workload.Keys("0badcafe", sample))
    assert script.count("\\elif :key = ") == 49 and script.rstrip().endswith("\\endif")
    assert "bench_key" not in script  # no lookup in the statement
    assert f"messages.user_id = '{sample[7]['user_id']}'" in script


def test_bench_runs_on_the_cluster_and_removes_its_rows(seeded, cli, tmp_path):
    before = seeded.scalar("SELECT count(*) FROM messages")
    result = cli(
        "bench",
        "--json",
        # Every pattern as often as the others, 16 transactions each expected: the default
        # mix gives history-unfiltered 5%, which two seconds at this rate can miss.
        "--mix",
        "history=1,recent=1,insert=1,message=1,history-unfiltered=1",
        "--rate",
        "40",
        "--duration",
        "2s",
        "--clients",
        "2",
        "--log-dir",
        str(tmp_path),
        "--database-url",
        seeded.cli_url,
    )
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output  # budgets on a shared machine may miss
    payload = json.loads(result.stdout)
    assert payload["command"] == "bench"
    assert payload["key_cost_ms"] is None  # the keys are drawn on the client: no lookup
    (phase,) = payload["phases"]
    for pattern in phase["patterns"]:
        assert pattern["transactions"] > 0 and pattern["failures"] == 0, pattern
    assert payload["bench_rows_removed"]["users"] == 2
    assert seeded.scalar("SELECT count(*) FROM users WHERE id LIKE 'bench-%'") == 0
    assert seeded.scalar("SELECT count(*) FROM messages") == before
    assert "\\if :key = 0" in (tmp_path / "message.sql").read_text()


def test_the_plain_server_keeps_its_lookup_in_the_statement(plain_db):
    # One server: no sample, each statement looks its key up, as before.
    assert runner._sample(plain_db.engine, 1000) == ()
    script = workload.WORKLOADS["history"].script(workload.Keys("0badcafe"))
    assert "bench_key" in script and "\\if" not in script
