"""The coordinator's server crashes during a purge on the cluster. Each batch deletes on a
worker and adds its counts to the run's audit row on the coordinator in one transaction.
Citus commits a modification of one shard in one phase: the worker commits first, in the
coordinator's pre-commit, then the coordinator. A crash between the two keeps the batch
on the worker without its counts, so after the restart and Citus's recovery the audit
row may lack the batch that was committing (one batch, with one job), never more; it
never counts a row that is still there, no message is left without its conversation,
and a rerun ends with the exact set."""

from __future__ import annotations

import subprocess

import psycopg
import servers
from test_lifecycle import _start, _wait_for_batches, predicted_purge, run_json, state

from citus.test_lifecycle import populate

#: chatdb_runs.counts of a purge, by the table each counts.
COUNTS = {
    "conversations": "conversations",
    "messages": "messages",
    "conversations_archive": "archive_conversations",
    "messages_archive": "archive_messages",
}


def pg_ctl(cluster: servers.CitusCluster, *args: str) -> None:
    command = [str(servers.citus_bin() / "pg_ctl"), "-D", str(cluster.coordinator.data), *args]
    subprocess.run(servers._as(cluster.user, command), check=True, capture_output=True, timeout=120)


def prepared_on_workers(db) -> int:
    assert db.cluster is not None
    found = 0
    for worker in db.cluster.workers:
        with psycopg.connect(worker.conninfo(db.name), autocommit=True) as connection:
            found += connection.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchone()[0]
    return found


def test_a_coordinator_crash_during_purge_separates_no_batch_from_its_audit_row(citus_migrated_db, cli):
    db = citus_migrated_db
    cluster = db.cluster
    assert cluster is not None
    populate(db, conversations=1500, users=40)
    before = state(db)
    for table in before:
        db.execute(f"CREATE TABLE snap_{table} AS SELECT * FROM {table}")
    process = _start(db, "purge", "--older-than", "90d", "--batch-size", "2", "--jobs", "1")
    _wait_for_batches(db, process)
    db.engine.dispose()
    try:
        pg_ctl(cluster, "-m", "immediate", "-w", "stop")
    finally:
        pg_ctl(cluster, "-l", str(cluster.coordinator.data / "server.log"), "-w", "start")
    process.communicate(timeout=120)
    assert process.returncode != 0  # its server went away under it
    db.engine.dispose()

    db.execute("SELECT recover_prepared_transactions()")
    assert prepared_on_workers(db) == 0
    crashed = db.scalar("SELECT counts FROM chatdb_runs WHERE outcome = 'running'")
    assert crashed is not None
    after = state(db)
    gone = {table: before[table] - after[table] for table in before}
    assert sum(len(rows) for rows in gone.values()) > 0
    # The audit row counts no row that is still there, and lacks at most the one batch
    # whose commit the crash split (two conversations, with their messages).
    counted = {table: int(crashed[key]) for table, key in COUNTS.items()}
    for table in gone:
        assert counted[table] <= len(gone[table]), table
    assert len(gone["conversations"]) - counted["conversations"] <= 2
    orphans = (
        "SELECT count(*) FROM messages m LEFT JOIN conversations c"
        " ON c.user_id = m.user_id AND c.id = m.conversation_id WHERE c.id IS NULL"
    )
    assert db.scalar(orphans) == 0

    out = run_json(cli, db, "purge", "--older-than", "90d")
    predicted = predicted_purge(db, out["cutoff"], out["deleted_cutoff"], prefix="snap_")
    final = state(db)
    for table in before:
        assert final[table] == before[table] - predicted[table], table
    assert all(predicted.values())
