"""``chatdb migrate`` on a Citus coordinator: the chain, then the layout (README, "Running
on Citus"): conversations, messages and their archives distributed by user_id and
co-located, users a reference table, chatdb's own tables on the coordinator, chatdb_runs
among them a Citus local table (so that each lifecycle batch commits with its audit row
in two phases)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.exc import IntegrityError
from test_lifecycle import one_error, run_json
from test_schema_migrations import snap

from chatdb.schema import CHATDB_TABLES, chatdb_runs

LAYOUT = (
    "SELECT json_object_agg(logicalrelid::regclass::text, json_build_array(partmethod,"
    " column_to_column_name(logicalrelid, partkey), colocationid)) FROM pg_dist_partition"
)
APP_USERS = (
    "CREATE TABLE users (id varchar(255) PRIMARY KEY, email text); INSERT INTO users VALUES ('app-1', 'a@b')"
)


def test_migrate_builds_head_and_distributes_the_tables_by_user_id(citus_db, plain_db, cli):
    first = cli("migrate", "--database-url", citus_db.cli_url)
    assert first.exit_code == 0, first.output
    assert "Distributed by user_id on Citus, co-located: conversations, messages," in first.stdout
    assert "Added to Citus's metadata, on the coordinator: chatdb_runs (each batch commits" in first.stdout
    layout = citus_db.scalar(LAYOUT)
    distributed = {name: layout[name] for name in layout if layout[name][0] == "h"}
    assert set(distributed) == {"conversations", "messages", "conversations_archive", "messages_archive"}
    assert {(column, group) for _, column, group in distributed.values()} == {
        ("user_id", distributed["conversations"][2])
    }
    assert layout["users"][0] == "n"  # reference: chatdb created it, so chatdb made it one
    # A Citus local table: in the metadata, not co-located with anything, on the coordinator.
    assert layout["chatdb_runs"] == ["n", None, 0]
    assert "chatdb_size_history" not in layout
    assert citus_db.scalar(
        "SELECT array_agg(n.groupid) FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)"
        " JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'chatdb_runs'::regclass"
    ) == [0]
    # The coordinator's tables are what head declares, keys and foreign keys included.
    # Citus rebuilds a table it distributes from its own deparse of the definition, which
    # writes the casts in the CHECK constraints differently (the same check).
    owned = [table.name for table in CHATDB_TABLES]
    differences = snap(citus_db.engine, owned).differences(snap(plain_db.engine, owned))
    assert all(" constraint chk_" in difference for difference in differences), differences
    with pytest.raises(IntegrityError, match="chk_conversation_status"):
        citus_db.execute(
            "INSERT INTO users (id) VALUES ('u');"
            " INSERT INTO conversations (user_id, status) VALUES ('u', 'gone')"
        )
    again = cli("migrate", "--json", "--database-url", citus_db.cli_url)
    assert again.exit_code == 0, again.output
    payload = json.loads(again.stdout)
    assert payload["applied"] == [] and payload["distributed"] == [] and payload["citus_local"] == []


def test_a_local_application_users_table_stops_migrate_with_the_statement_to_run(citus_db, cli):
    citus_db.execute(APP_USERS)
    refused = cli("migrate", "--database-url", citus_db.cli_url)
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "SELECT create_reference_table('users')" in lines[0]
    assert "--reference-users" in lines[0]
    assert citus_db.scalar("SELECT to_regclass('conversations')") is None
    assert citus_db.scalar("SELECT count(*) FROM pg_dist_partition") == 0


def test_reference_users_makes_the_application_users_a_reference_table(citus_db, cli):
    citus_db.execute(APP_USERS)
    result = cli("migrate", "--reference-users", "--database-url", citus_db.cli_url)
    assert result.exit_code == 0, result.output
    assert citus_db.scalar(LAYOUT)["users"][0] == "n"
    assert citus_db.scalar("SELECT email FROM users WHERE id = 'app-1'") == "a@b"
    assert citus_db.scalar("SELECT obj_description('users'::regclass, 'pg_class')") is None


def test_an_application_users_already_a_reference_table_is_used_as_it_is(citus_db, cli):
    citus_db.execute(APP_USERS + "; SELECT create_reference_table('users')")
    result = cli("migrate", "--database-url", citus_db.cli_url)
    assert result.exit_code == 0, result.output
    assert citus_db.scalar(LAYOUT)["messages"][0] == "h"


def test_a_coordinator_outside_citus_metadata_stops_migrate_with_the_statement_to_run(citus_db, cli):
    assert citus_db.cluster is not None
    port = citus_db.cluster.coordinator.port
    citus_db.execute("SELECT citus_remove_node('localhost', :port)", port=port)
    refused = cli("migrate", "--database-url", citus_db.cli_url)
    assert refused.exit_code == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "the coordinator is not in Citus's metadata" in lines[0]
    assert f"run SELECT citus_set_coordinator_host('<host>', {port}) on it" in lines[0]
    assert citus_db.scalar("SELECT to_regclass('conversations')") is None
    assert citus_db.scalar("SELECT count(*) FROM pg_dist_partition") == 0

    citus_db.execute("SELECT citus_set_coordinator_host('localhost', :port)", port=port)
    result = cli("migrate", "--database-url", citus_db.cli_url)
    assert result.exit_code == 0, result.output
    assert citus_db.scalar(LAYOUT)["chatdb_runs"][0] == "n"


def test_chatdb_runs_outside_citus_metadata_stops_the_lifecycle_until_migrate_adds_it(citus_migrated_db, cli):
    """A cluster that an earlier chatdb distributed: chatdb_runs a plain table of the
    coordinator, with runs in it. purge refuses before it records anything; migrate adds
    the table to Citus's metadata, keeping its rows and the numbering of its runs."""
    db = citus_migrated_db
    db.execute("DROP TABLE chatdb_runs")
    chatdb_runs.create(db.engine)
    db.execute(
        "INSERT INTO chatdb_runs (command, outcome) VALUES ('purge', 'succeeded'), ('archive', 'failed')"
    )
    assert "chatdb_runs" not in db.scalar(LAYOUT)

    refused = cli("purge", "--older-than", "90d", "--database-url", db.cli_url)
    assert refused.exit_code == 1
    assert one_error(refused) == (
        "error: chatdb_runs is not in Citus's metadata, so a batch would not commit together with its"
        " audit row; run chatdb migrate"
    )
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 2

    result = cli("migrate", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "Added to Citus's metadata, on the coordinator: chatdb_runs (each batch commits with its audit row"
        " in two phases)."
    ]
    assert db.scalar(LAYOUT)["chatdb_runs"][0] == "n"
    run_json(cli, db, "purge", "--older-than", "90d")
    runs = db.scalar("SELECT json_agg(json_build_array(id, command, outcome) ORDER BY id) FROM chatdb_runs")
    assert runs == [[1, "purge", "succeeded"], [2, "archive", "failed"], [3, "purge", "succeeded"]]


@pytest.mark.parametrize(
    "args",
    [
        ("migrate", "down", "-1", "--yes"),
        ("migrate", "down", "0003", "--yes"),
        ("migrate", "down", "base", "--yes"),
        ("migrate", "stamp", "0006"),
    ],
    ids=["down-1", "down-0003", "down-base", "stamp-0006"],
)
def test_going_below_the_keys_with_user_id_is_refused_before_anything_changes(citus_migrated_db, cli, args):
    before = citus_migrated_db.scalar(LAYOUT)
    result = cli(*args, "--database-url", citus_migrated_db.cli_url)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "on Citus: the distributed tables (conversations, messages," in lines[0]
    assert "need primary keys that include user_id" in lines[0]
    assert "Traceback" not in result.output
    assert (
        citus_migrated_db.scalar("SELECT version_num FROM chatdb_alembic_version") == "0007_keys_with_user_id"
    )
    assert citus_migrated_db.scalar(LAYOUT) == before
    keys = citus_migrated_db.scalar(
        "SELECT json_object_agg(conrelid::regclass::text, pg_get_constraintdef(oid)) FROM pg_constraint"
        " WHERE contype = 'p' AND conrelid::regclass::text LIKE ANY (ARRAY['conversations%', 'messages%'])"
    )
    assert set(keys.values()) == {"PRIMARY KEY (id, user_id)"}, keys
