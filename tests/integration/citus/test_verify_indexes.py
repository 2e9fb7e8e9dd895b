"""``chatdb verify-indexes`` on the cluster: the coordinator's tables against schema.py,
each distributed table's layout, the indexes of every shard placement, and each pattern
proved on the plans the shards run."""

from __future__ import annotations

import json

import psycopg

from chatdb.schema import DISTRIBUTED_TABLES


def verify(cli, database) -> tuple[int, dict]:
    result = cli("verify-indexes", "--json", "--database-url", database.cli_url)
    return result.exit_code, json.loads(result.stdout)


def failed(payload) -> list[dict]:
    return [check for check in payload["checks"] if check["status"] == "fail"]


def on_worker(database, table: str, statement: str) -> str:
    """Run ``statement`` on the worker that holds the first shard of ``table``
    (``{shard}`` and ``{shard_id}`` stand for the shard's name and id); returns the name."""
    shard, shard_id, port = database.scalar(
        "SELECT json_build_array(shard_name, shardid, nodeport) FROM citus_shards"
        " WHERE table_name = CAST(:t AS regclass) ORDER BY shardid LIMIT 1",
        t=table,
    )
    conninfo = f"host=localhost port={port} user=postgres dbname={database.name}"
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(statement.format(shard=shard, shard_id=shard_id))
    return shard


def test_a_distributed_database_passes_every_check(citus_migrated_db, cli):
    code, payload = verify(cli, citus_migrated_db)
    assert code == 0, failed(payload)
    assert {table: detail for table, (_, detail, _) in distribution(payload).items()} == {
        table.name: "distributed by user_id, co-located" for table in DISTRIBUTED_TABLES
    }
    assert keys(payload) == {
        "fk_messages_conversation_owner": ("ok", "foreign key to conversations: present", None),
        ARCHIVE_KEY: ("ok", "foreign key to conversations_archive: present", None),
    }
    shards = [c for c in payload["checks"] if c["check"] == "shards"]
    assert {c["table"] for c in shards} == {table.name for table in DISTRIBUTED_TABLES}
    assert all(c["detail"] == "on all 8 shard placements, as on the coordinator" for c in shards)
    assert {c["index"] for c in shards if c["table"] == "messages"} == {
        index.name for index in DISTRIBUTED_TABLES[1].indexes
    } | {"messages_pkey"}
    queries = {c["index"]: c["detail"] for c in payload["checks"] if c["check"] == "query"}
    # A pattern with an equality on user_id runs on one shard; the others on every shard.
    assert queries["idx_conversations_user_status_updated"].endswith("on its user's shard")
    assert queries["idx_conversations_updated_id"].endswith("on each of 8 shards")


def test_an_index_missing_on_one_shard_fails_its_check_and_its_pattern(citus_migrated_db, cli):
    shard = on_worker(
        citus_migrated_db, "conversations", "DROP INDEX idx_conversations_updated_id_{shard_id}"
    )
    code, payload = verify(cli, citus_migrated_db)
    assert code == 1
    found = {(c["table"], c["index"], c["check"]): c["detail"] for c in failed(payload)}
    assert set(found) == {
        ("conversations", "idx_conversations_updated_id", "shards"),
        ("conversations", "idx_conversations_updated_id", "query"),
    }
    assert found[("conversations", "idx_conversations_updated_id", "shards")].startswith(
        f"missing on shard {shard} on localhost:"
    )
    assert (
        "(on 1 of 8 shards, such as one on localhost:"
        in found[("conversations", "idx_conversations_updated_id", "query")]
    )


def test_an_index_only_on_a_shard_is_found(citus_migrated_db, cli):
    shard = on_worker(citus_migrated_db, "messages", "CREATE INDEX stray ON {shard} (role)")
    code, payload = verify(cli, citus_migrated_db)
    assert code == 1
    (finding,) = failed(payload)
    assert (finding["table"], finding["index"], finding["check"]) == ("messages", "stray", "shards")
    assert finding["detail"].startswith(f"on shard {shard} on localhost:")


def distribution(payload) -> dict[str, tuple[str, str, str | None]]:
    """The distribution check of each table: (status, detail, fix)."""
    checks = [c for c in payload["checks"] if c["check"] == "distribution" and c["index"] is None]
    return {c["table"]: (c["status"], c["detail"], c["fix"]) for c in checks}


def keys(payload) -> dict[str, tuple[str, str, str | None]]:
    """The distribution check of each foreign key between the distributed tables, by its
    name: (status, detail, fix)."""
    checks = [c for c in payload["checks"] if c["check"] == "distribution" and c["index"] is not None]
    return {c["index"]: (c["status"], c["detail"], c["fix"]) for c in checks}


ARCHIVE_KEY = "fk_messages_archive_conversation_owner"


def test_a_table_out_of_the_co_location_group_fails_and_its_fix_puts_it_back(citus_migrated_db, cli):
    """messages_archive taken out of the tables' co-location group (its shards stay where
    they are): a user's rows are no longer known to be on one node, and Citus plans the
    joins chatdb relies on (a message with its conversation) as if they were not."""
    db = citus_migrated_db
    db.execute("SELECT update_distributed_table_colocation('messages_archive', colocate_with => 'none')")
    code, payload = verify(cli, db)
    assert code == 1
    found = distribution(payload)
    fix = "SELECT update_distributed_table_colocation('messages_archive', colocate_with => 'conversations');"
    assert found.pop("messages_archive") == (
        "fail",
        "not co-located with conversations: a user's rows are on several nodes",
        fix,
    )
    assert found == {
        table: ("ok", "distributed by user_id, co-located", None)
        for table in ("conversations", "messages", "conversations_archive")
    }
    assert [(c["table"], c["check"]) for c in failed(payload)] == [("messages_archive", "distribution")]
    # chatdb migrate refuses this layout, with the same fix.
    refused = cli("migrate", "--database-url", db.cli_url)
    assert refused.exit_code == 1
    assert "messages_archive is not co-located with the other tables" in refused.stderr
    assert f"run {fix} then the command again" in " ".join(refused.stderr.split())
    db.execute(fix)
    code, payload = verify(cli, db)
    assert code == 0, failed(payload)


def without_distribution(database, table: str = "messages_archive") -> None:
    """Make ``table`` a plain table of the coordinator again: ``undistribute_table``, once
    its foreign key to its conversations is gone (Citus keeps a foreign key between
    distributed tables only, co-located)."""
    database.execute(f"ALTER TABLE {table} DROP CONSTRAINT fk_{table}_conversation_owner")
    database.execute(f"SELECT undistribute_table('{table}')")


def test_a_table_not_distributed_fails_its_check_and_chatdb_migrate_distributes_it_again(
    citus_migrated_db, cli
):
    db = citus_migrated_db
    without_distribution(db)
    code, payload = verify(cli, db)
    assert code == 1
    found = distribution(payload)
    assert found.pop("messages_archive") == (
        "fail",
        "not distributed on this Citus cluster; chatdb distributes it by user_id",
        "chatdb migrate",
    )
    assert found == {
        table: ("ok", "distributed by user_id, co-located", None)
        for table in ("conversations", "messages", "conversations_archive")
    }
    assert keys(payload)[ARCHIVE_KEY] == (
        "fail",
        "foreign key to conversations_archive is missing: nothing holds a message to its conversation",
        f"ALTER TABLE messages_archive ADD CONSTRAINT {ARCHIVE_KEY} FOREIGN KEY(conversation_id, user_id)"
        " REFERENCES conversations_archive (id, user_id) ON DELETE CASCADE;",
    )
    assert [(c["table"], c["check"]) for c in failed(payload)] == [
        ("messages_archive", "distribution"),
        ("messages_archive", "distribution"),
    ]
    # The fix it gives: chatdb migrate distributes the table again, with its foreign key.
    migrated = cli("migrate", "--database-url", db.cli_url)
    assert migrated.exit_code == 0, migrated.output
    code, payload = verify(cli, db)
    assert code == 0, failed(payload)
    assert (
        db.scalar(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'fk_messages_archive_conversation_owner'"
        )
        == 1
    )


def test_a_table_distributed_by_another_column_fails_its_distribution_check(citus_migrated_db, cli):
    db = citus_migrated_db
    without_distribution(db)
    db.execute("SELECT create_distributed_table('messages_archive', 'id')")
    code, payload = verify(cli, db)
    assert code == 1
    found = distribution(payload)
    fix = (
        "SELECT alter_distributed_table('messages_archive', distribution_column => 'user_id', "
        "colocate_with => 'conversations');"
    )
    assert found.pop("messages_archive") == (
        "fail",
        "distributed by id on this Citus cluster; chatdb distributes it by user_id",
        fix,
    )
    assert found == {
        table: ("ok", "distributed by user_id, co-located", None)
        for table in ("conversations", "messages", "conversations_archive")
    }
    # Citus kept no foreign key to a table not co-located: its fix comes with it.
    key_fix = keys(payload)[ARCHIVE_KEY][2]
    assert keys(payload)[ARCHIVE_KEY][0] == "fail"
    # chatdb migrate refuses this layout, with the same fix.
    refused = cli("migrate", "--database-url", db.cli_url)
    assert refused.exit_code == 1
    assert "messages_archive is distributed by id; chatdb needs it distributed by user_id" in refused.stderr
    assert f"run {fix} then the command again" in " ".join(refused.stderr.split())
    # The fixes, in the order given, leave nothing to report.
    db.execute(fix)
    db.execute(key_fix)
    code, payload = verify(cli, db)
    assert code == 0, failed(payload)
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = :name", name=ARCHIVE_KEY) == 1
    assert cli("migrate", "--database-url", db.cli_url).exit_code == 0
