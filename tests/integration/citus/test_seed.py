"""``chatdb seed`` on the cluster: COPY into the distributed tables and the reference
``users`` in one transaction, the same rows as on one server, and ``--reset``."""

from __future__ import annotations

import json

from test_seed_command import PINNED_CHECKSUM, PINNED_SIZES, checksum


def seed(cli, database, *args: str) -> dict:
    result = cli("seed", "--json", "--database-url", database.cli_url, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_seed_loads_the_same_rows_as_on_one_server(citus_migrated_db, cli):
    first = seed(cli, citus_migrated_db, *PINNED_SIZES)
    assert first["fast_path"] is True
    assert checksum(citus_migrated_db, first["anchor"], 7) == PINNED_CHECKSUM
    # Beside it, into tables that hold rows (with every key and index in place).
    beside = seed(
        cli, citus_migrated_db, "--users", "5", "--conversations", "30", "--messages", "200", "--seed", "8"
    )
    assert beside["fast_path"] is False
    # The rows are on the workers, each in the shard of its user_id.
    assert (
        citus_migrated_db.scalar(
            "SELECT count(DISTINCT nodeport) FROM citus_shards WHERE table_name = 'messages'::regclass"
            " AND shard_size > 0"
        )
        == 2
    )
    assert citus_migrated_db.scalar("SELECT count(*) FROM messages") == 1700


def test_seed_reset_on_the_cluster(citus_migrated_db, cli):
    seed(cli, citus_migrated_db, "--users", "5", "--conversations", "30", "--messages", "200")
    citus_migrated_db.execute(
        "INSERT INTO users (id) VALUES ('app-1'); INSERT INTO conversations (user_id) VALUES ('app-1')"
    )
    again = seed(
        cli,
        citus_migrated_db,
        "--reset",
        "--yes",
        "--users",
        "6",
        "--conversations",
        "40",
        "--messages",
        "300",
    )
    assert again["users"] == 6
    assert citus_migrated_db.scalar("SELECT count(*) FROM messages") == 300
    assert citus_migrated_db.scalar("SELECT count(*) FROM conversations WHERE user_id = 'app-1'") == 1
