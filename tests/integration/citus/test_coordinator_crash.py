"""The coordinator's server crashes during a purge on the cluster. Each batch deletes on a
worker and adds its counts to the run's audit row on the coordinator, in one transaction.
``chatdb_runs`` is a Citus local table, so Citus commits that transaction in two phases:
PREPARE TRANSACTION on the worker, then the coordinator's commit, which records the
decision (``pg_dist_transaction``), then COMMIT PREPARED. After the restart and Citus's
recovery (``recover_prepared_transactions()``), a batch is on both sides or on neither:
the audit row counts exactly the rows gone, no prepared transaction is left, no message
is left without its conversation, and a rerun ends with the exact set.

The first test crashes the coordinator at some point of the run. The second crashes it
while a worker is inside the batch's commit: the worker's commits wait for a synchronous
standby that does not exist (``synchronous_standby_names``), the commit record already
written. A batch committed in one phase, as Citus commits a write to one shard, would
then be kept on the worker without its counts."""

from __future__ import annotations

import subprocess
import time

import psycopg
import servers
from test_lifecycle import _start, _wait_for_batches, populate, predicted_purge, run_json, state

#: chatdb_runs.counts of a purge, by the table each counts.
COUNTS = {
    "conversations": "conversations",
    "messages": "messages",
    "conversations_archive": "archive_conversations",
    "messages_archive": "archive_messages",
}
ORPHANS = (
    "SELECT count(*) FROM messages m LEFT JOIN conversations c"
    " ON c.user_id = m.user_id AND c.id = m.conversation_id WHERE c.id IS NULL"
)


def pg_ctl(cluster: servers.CitusCluster, *args: str) -> None:
    command = [str(servers.citus_bin() / "pg_ctl"), "-D", str(cluster.coordinator.data), *args]
    subprocess.run(servers._as(cluster.user, command), check=True, capture_output=True, timeout=120)


def on_workers(db, statement: str) -> int:
    """``statement`` (one integer) on every worker, in the test's database: the sum."""
    assert db.cluster is not None
    found = 0
    for worker in db.cluster.workers:
        with psycopg.connect(worker.conninfo(db.name), autocommit=True) as connection:
            found += connection.execute(statement).fetchone()[0]
    return found


def prepared_on_workers(db) -> int:
    return on_workers(db, "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")


def hold_worker_commits(db, hold: bool) -> None:
    """Make every worker's commits wait for a synchronous standby that does not exist
    (their commit record written, not yet acknowledged), or stop it: the waits end."""
    assert db.cluster is not None
    setting = (
        "SET synchronous_standby_names = 'chatdb_test_absent'" if hold else "RESET synchronous_standby_names"
    )
    for worker in db.cluster.workers:
        with psycopg.connect(worker.conninfo(), autocommit=True) as connection:
            connection.execute(f"ALTER SYSTEM {setting}")
            connection.execute("SELECT pg_reload_conf()")


def start_purge(db):
    populate(db, conversations=1500, users=40)
    before = state(db)
    for table in before:
        db.execute(f"CREATE TABLE snap_{table} AS SELECT * FROM {table}")
    process = _start(db, "purge", "--older-than", "90d", "--batch-size", "2", "--jobs", "1")
    _wait_for_batches(db, process)
    return before, process


def crash_coordinator(db, then=None) -> None:
    """Stop the coordinator's server at once (no shutdown checkpoint, its sessions cut
    off), run ``then``, and start it again."""
    cluster = db.cluster
    assert cluster is not None
    db.engine.dispose()
    try:
        pg_ctl(cluster, "-m", "immediate", "-w", "stop")
    finally:
        try:
            if then is not None:
                then()
        finally:
            pg_ctl(cluster, "-l", str(cluster.coordinator.data / "server.log"), "-w", "start")


def crash_while_a_worker_commits(db, process) -> None:
    """Hold the workers' commits, wait until a batch of ``process`` is inside one (its
    commit record written, waiting for the absent standby), and crash the coordinator;
    the workers' commits are let go while it is down."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND wait_event = 'SyncRep'"
    )
    try:
        hold_worker_commits(db, True)
        deadline = time.monotonic() + 60
        while not on_workers(db, waiting):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no batch reached its worker's commit"
            time.sleep(0.01)
        crash_coordinator(db, then=lambda: hold_worker_commits(db, False))
    finally:
        hold_worker_commits(db, False)


def assert_batches_and_counts_together(db, cli, before, process) -> None:
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
    # Every batch that committed on its worker is counted, and nothing else.
    counted = {table: int(crashed[key]) for table, key in COUNTS.items()}
    assert counted == {table: len(rows) for table, rows in gone.items()}
    assert db.scalar(ORPHANS) == 0

    out = run_json(cli, db, "purge", "--older-than", "90d")
    predicted = predicted_purge(db, out["cutoff"], out["deleted_cutoff"], prefix="snap_")
    final = state(db)
    for table in before:
        assert final[table] == before[table] - predicted[table], table
    assert all(predicted.values())


def test_a_coordinator_crash_during_purge_separates_no_batch_from_its_audit_row(citus_migrated_db, cli):
    db = citus_migrated_db
    before, process = start_purge(db)
    crash_coordinator(db)
    assert_batches_and_counts_together(db, cli, before, process)


def test_a_coordinator_crash_while_a_worker_commits_a_batch_keeps_it_with_its_counts(citus_migrated_db, cli):
    db = citus_migrated_db
    before, process = start_purge(db)
    crash_while_a_worker_commits(db, process)
    assert_batches_and_counts_together(db, cli, before, process)
