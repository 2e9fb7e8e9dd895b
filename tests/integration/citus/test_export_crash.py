"""The coordinator's server crashes during ``chatdb archive --export`` on the cluster. Each
batch moves its conversations on a worker, adds its counts and the file's new length to
the run's audit row on the coordinator, in one transaction committed in two phases
(tests/integration/citus/test_coordinator_crash.py), and its lines are in the file
before that commit. After the restart and Citus's recovery (``SELECT
recover_prepared_transactions()``), the length the audit row committed is where the
lines of the committed batches end, and the rerun with the same file cuts what follows
(a batch that never committed) before it appends: the file holds each archived
conversation once, the archive is the SQL oracle's set, and the hot and archive tables
together hold the rows they held before, each once.

The first test crashes the coordinator at some point of the run; the second while a
worker is inside a batch's commit (its commits wait for a synchronous standby that does
not exist), that batch's lines already in the file. Each runs with ``.jsonl`` and
``.jsonl.gz``."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_export_crash import assert_exactly, conversations_in, lines_of
from test_lifecycle import (
    _start,
    _wait_for_batches,
    checksum,
    ids,
    populate,
    predicted_archive,
    run_json,
    state,
)

from citus.test_coordinator_crash import (
    ORPHANS,
    crash_coordinator,
    crash_while_a_worker_commits,
    prepared_on_workers,
)
from citus.test_lifecycle import MUNION, UNION

#: Messages in the archive without their conversation there (or with it still hot).
ARCHIVE_ORPHANS = (
    "SELECT count(*) FROM messages_archive m LEFT JOIN conversations_archive c"
    " ON c.user_id = m.user_id AND c.id = m.conversation_id WHERE c.id IS NULL"
)
SPLIT = (
    "SELECT count(*) FROM messages_archive m JOIN conversations c"
    " ON c.user_id = m.user_id AND c.id = m.conversation_id"
)
SUFFIXES = pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])


def start_archive(db, export: Path):
    populate(db, conversations=1500, users=40)
    before = state(db)
    for table in before:
        db.execute(f"CREATE TABLE snap_{table} AS SELECT * FROM {table}")
    unions = (checksum(db, UNION), checksum(db, MUNION))
    process = _start(
        db, "archive", "--older-than", "90d", "--export", str(export), "--batch-size", "2", "--jobs", "1"
    )
    _wait_for_batches(db, process)
    return before, unions, process


def assert_each_conversation_once(db, cli, export: Path, before, unions, process) -> list[dict]:
    """After the crash: a batch's rows, counts and committed length together, on both
    sides or neither; after the rerun, the file and the tables exact. Returns the lines
    that followed the committed length after the crash."""
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0  # its server went away under it
    assert "Traceback" not in stderr, stderr
    db.engine.dispose()

    db.execute("SELECT recover_prepared_transactions()")
    assert prepared_on_workers(db) == 0
    crashed_id = db.scalar("SELECT id FROM chatdb_runs WHERE outcome = 'running'")
    assert crashed_id is not None
    crashed = db.scalar("SELECT counts FROM chatdb_runs WHERE id = :i", i=crashed_id)
    after = state(db)
    moved = after["conversations_archive"] - before["conversations_archive"]
    moved_messages = after["messages_archive"] - before["messages_archive"]
    assert moved, "no batch committed before the crash"
    # Moved, not copied: what left the hot tables is exactly what reached the archive.
    assert before["conversations"] - after["conversations"] == moved
    assert before["messages"] - after["messages"] == moved_messages
    assert before["conversations_archive"] <= after["conversations_archive"]
    assert before["messages_archive"] <= after["messages_archive"]
    # Every batch that committed on its worker is counted, and nothing else.
    counted = {key: int(crashed[key]) for key in ("conversations", "messages", "exported")}
    assert counted == {"conversations": len(moved), "messages": len(moved_messages), "exported": len(moved)}
    assert (int(crashed["archive_conversations"]), int(crashed["archive_messages"])) == (0, 0)
    assert db.scalar(ORPHANS) == 0
    assert db.scalar(ARCHIVE_ORPHANS) == 0
    assert db.scalar(SPLIT) == 0
    assert (checksum(db, UNION), checksum(db, MUNION)) == unions
    # The committed length ends the lines of the committed batches; what follows is the
    # lines of a batch that never committed, whose conversations are still hot.
    committed = int(crashed["export_bytes"])
    assert_exactly(db, lines_of(export, end=committed), moved, moved_messages)
    pending = lines_of(export, start=committed)
    assert set(conversations_in(pending)) <= after["conversations"]

    out = run_json(cli, db, "archive", "--older-than", "90d", "--export", str(export))
    assert out["took_over"] == [crashed_id]
    final = state(db)
    archived = final["conversations_archive"] - before["conversations_archive"]
    archived_messages = final["messages_archive"] - before["messages_archive"]
    assert_exactly(db, lines_of(export), archived, archived_messages)
    assert len(lines_of(export)) == counted["exported"] + out["exported"]
    # The oracle, on the snapshot: the conversations idle past the cutoff and not deleted.
    oracle = "SELECT id FROM snap_conversations WHERE updated_at < :cutoff AND deleted_at IS NULL"
    assert archived == ids(db, oracle, cutoff=out["cutoff"])
    assert archived_messages == ids(
        db, f"SELECT id FROM snap_messages WHERE conversation_id IN ({oracle})", cutoff=out["cutoff"]
    )
    assert predicted_archive(db, out["cutoff"]) == {"conversations": set(), "messages": set()}
    # Nothing lost, nothing doubled: hot and archive together are the snapshot, each row once.
    for hot, archive in (("conversations", "conversations_archive"), ("messages", "messages_archive")):
        assert not final[hot] & final[archive], hot
        assert final[hot] | final[archive] == before[hot] | before[archive], hot
        assert db.scalar(f"SELECT (SELECT count(*) FROM {hot}) + (SELECT count(*) FROM {archive})") == (
            db.scalar(f"SELECT (SELECT count(*) FROM snap_{hot}) + (SELECT count(*) FROM snap_{archive})")
        )
    assert (checksum(db, UNION), checksum(db, MUNION)) == unions
    assert db.scalar(ORPHANS) == 0
    assert db.scalar(ARCHIVE_ORPHANS) == 0
    return pending


@SUFFIXES
def test_a_coordinator_crash_during_archive_export_leaves_each_conversation_once(
    citus_migrated_db, cli, tmp_path, suffix
):
    db = citus_migrated_db
    export = tmp_path / f"archive{suffix}"
    before, unions, process = start_archive(db, export)
    crash_coordinator(db)
    assert_each_conversation_once(db, cli, export, before, unions, process)


@SUFFIXES
def test_a_coordinator_crash_while_a_worker_commits_an_export_batch_leaves_each_conversation_once(
    citus_migrated_db, cli, tmp_path, suffix
):
    """The batch in the worker's commit had its lines in the file (fsynced before the
    COMMIT); its commit never reached the coordinator, so recovery rolls it back, the
    committed length stops before its lines, and the rerun cuts them."""
    db = citus_migrated_db
    export = tmp_path / f"archive{suffix}"
    before, unions, process = start_archive(db, export)
    crash_while_a_worker_commits(db, process)
    pending = assert_each_conversation_once(db, cli, export, before, unions, process)
    assert pending, "the lines of the batch in its worker's commit are not in the file"
