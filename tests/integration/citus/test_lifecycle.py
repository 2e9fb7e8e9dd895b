"""archive, archive restore and purge on the cluster: the same guarantees as on one server
(tests/integration/test_lifecycle.py), with every batch confined to one shard
(``chatdb.lifecycle.distributed``): exact sets against an SQL oracle, rows the
application holds skipped and then taken (purge and restore), SIGKILL and a rerun
(archive, restore and purge), checksums of archive and restore, and the export file with
each conversation exactly once."""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest
from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql
from test_lifecycle import (
    _start,
    checksum,
    engine_for,
    ids,
    killed_in_the_middle,
    populate,
    predicted_archive,
    predicted_purge,
    purge_exactly_as_predicted,
    run_json,
    state,
)

from chatdb import lifecycle
from chatdb.lifecycle import distributed
from chatdb.schema import conversations

UNION = (
    "(SELECT id, user_id, title, updated_at, deleted_at FROM conversations"
    " UNION ALL SELECT id, user_id, title, updated_at, deleted_at FROM conversations_archive)"
)
MUNION = (
    "(SELECT id, conversation_id, content, created_at, deleted_at FROM messages"
    " UNION ALL SELECT id, conversation_id, content, created_at, deleted_at FROM messages_archive)"
)


def test_a_batch_locks_its_rows_with_a_router_query_on_one_shard(citus_migrated_db):
    """The users of one batch hash to one shard: Citus sends its SELECT ... FOR UPDATE
    SKIP LOCKED to that shard whole (one task, the lock on the worker)."""
    db = citus_migrated_db
    populate(db)
    shard_of = dict(
        db.engine.connect()
        .execute(
            text(
                "SELECT user_id, get_shard_id_for_distribution_column('conversations', user_id)"
                " FROM (SELECT DISTINCT user_id FROM conversations) u"
            )
        )
        .all()
    )
    first = min(shard_of.values())
    users = sorted(user for user, shard in shard_of.items() if shard == first)
    now = db.scalar("SELECT now()")
    query = distributed._pick(
        conversations, lifecycle.archivable(now), users, 10, (users[0], uuid.UUID(int=0))
    )
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    with db.engine.connect() as connection:
        plan = "\n".join(connection.exec_driver_sql("EXPLAIN " + sql).scalars())
    assert "Task Count: 1" in plan, plan
    assert "LockRows" in plan, plan
    engine = engine_for(db)
    try:
        assert distributed.applies(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("jobs", [1, 3])
def test_purge_deletes_exactly_what_sql_predicts_hot_and_archive(citus_migrated_db, jobs):
    db = citus_migrated_db
    result, gone = purge_exactly_as_predicted(db, jobs)
    run = db.scalar("SELECT counts FROM chatdb_runs WHERE id = :i", i=result.run_id)
    assert (run["conversations"], run["messages"]) == (len(gone["conversations"]), len(gone["messages"]))


def test_archive_moves_exactly_the_oracles_rows_exports_each_once_and_restore_brings_them_back(
    citus_migrated_db, cli, tmp_path
):
    db = citus_migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")  # start from an empty archive
    before = {table: checksum(db, table) for table in ("conversations", "messages")}
    unions = (checksum(db, UNION), checksum(db, MUNION))
    export = tmp_path / "archive.jsonl"
    out = run_json(cli, db, "archive", "--older-than", "60d", "--batch-size", "11", "--export", str(export))
    # The oracle, on the snapshot before: what stays in the hot tables now must not match.
    assert out["done"]["conversations"] > 0
    moved = ids(db, "SELECT id FROM conversations_archive")
    assert moved == ids(
        db,
        "SELECT id FROM conversations_archive WHERE updated_at < :c AND deleted_at IS NULL",
        c=out["cutoff"],
    )
    assert predicted_archive(db, out["cutoff"]) == {"conversations": set(), "messages": set()}
    assert out["done"]["conversations"] == len(moved)
    assert out["done"]["messages"] == db.scalar("SELECT count(*) FROM messages_archive")
    assert (checksum(db, UNION), checksum(db, MUNION)) == unions
    lines = export.read_text().splitlines()
    exported = [uuid.UUID(json.loads(line)["conversation"]["id"]) for line in lines]
    assert len(exported) == len(set(exported)) and set(exported) == moved
    assert sum(len(json.loads(line)["messages"]) for line in lines) == out["done"]["messages"]

    archived = sorted(moved, key=str)
    one_by_one = run_json(
        cli, db, "archive", "restore", *[arg for i in archived[:5] for arg in ("--conversation", str(i))]
    )
    assert one_by_one["done"]["conversations"] == 5
    for user in sorted(ids(db, "SELECT DISTINCT user_id FROM conversations_archive")):
        run_json(cli, db, "archive", "restore", "--user", user)
    assert db.scalar("SELECT count(*) FROM conversations_archive") == 0
    assert db.scalar("SELECT count(*) FROM messages_archive") == 0
    assert {table: checksum(db, table) for table in ("conversations", "messages")} == before


def test_rows_the_application_holds_are_skipped_then_taken(citus_migrated_db):
    db = citus_migrated_db
    populate(db)
    user, locked_id = (
        db.engine.connect()
        .execute(
            text(
                "SELECT user_id, id FROM conversations WHERE updated_at < now() - interval '200 days'"
                " ORDER BY updated_at LIMIT 1"
            )
        )
        .one()
    )
    holder = db.engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT 1 FROM conversations WHERE user_id = :u AND id = :i FOR UPDATE"),
        {"u": user, "i": locked_id},
    )
    process = _start(db, "purge", "--older-than", "90d", "--json")
    try:
        deadline = time.monotonic() + 60
        while (
            db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '90 days'") > 1
        ):
            assert time.monotonic() < deadline, "the purge made no progress"
            time.sleep(0.05)
        # Everything else is gone; the held conversation waits, its messages with it.
        assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=locked_id) == 1
        assert db.scalar("SELECT count(*) FROM messages WHERE conversation_id = :i", i=locked_id) > 0
        time.sleep(0.3)
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["ok"]
    assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=locked_id) == 0
    assert db.scalar("SELECT count(*) FROM messages WHERE conversation_id = :i", i=locked_id) == 0
    assert db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '90 days'") == 0


def test_sigkill_during_archive_then_a_rerun_loses_nothing_and_exports_each_once(
    citus_migrated_db, cli, tmp_path
):
    db = citus_migrated_db
    populate(db, conversations=1500, users=40)
    before = (checksum(db, UNION), checksum(db, MUNION))
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / "a.jsonl"
    killed = killed_in_the_middle(
        db, "archive", "--older-than", "60d", "--batch-size", "2", "--export", str(export)
    )
    assert (checksum(db, UNION), checksum(db, MUNION)) == before
    # Messages sit beside their conversation, hot or archived, never split.
    assert (
        db.scalar(
            "SELECT count(*) FROM messages_archive m JOIN conversations c"
            " ON c.user_id = m.user_id AND c.id = m.conversation_id"
        )
        == 0
    )
    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    assert out["took_over"] == [killed]
    assert (checksum(db, UNION), checksum(db, MUNION)) == before
    assert predicted_archive(db, out["cutoff"])["conversations"] == set()
    lines = export.read_text().splitlines()
    exported = {uuid.UUID(json.loads(line)["conversation"]["id"]) for line in lines}
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    assert exported == moved
    assert len(lines) == len(exported)
    runs = db.engine.connect().execute(text("SELECT outcome FROM chatdb_runs ORDER BY id")).scalars().all()
    assert runs == ["interrupted", "succeeded"]


def test_sigkill_during_purge_then_a_rerun_ends_as_the_oracle_says(citus_migrated_db, cli):
    db = citus_migrated_db
    populate(db, conversations=1500, users=40)
    before = state(db)
    for table in before:
        db.execute(f"CREATE TABLE snap_{table} AS SELECT * FROM {table}")
    killed_in_the_middle(db, "purge", "--older-than", "90d", "--batch-size", "2")
    assert state(db)["conversations"] != before["conversations"]
    orphans = (
        "SELECT count(*) FROM messages m LEFT JOIN conversations c"
        " ON c.user_id = m.user_id AND c.id = m.conversation_id WHERE c.id IS NULL"
    )
    assert db.scalar(orphans) == 0
    out = run_json(cli, db, "purge", "--older-than", "90d")
    gone = predicted_purge(db, out["cutoff"], out["deleted_cutoff"], prefix="snap_")
    after = state(db)
    for table in before:
        assert after[table] == before[table] - gone[table], table
    assert all(gone.values())


#: Conversations both hot and archived, and messages on the other side from their
#: conversation: none, ever.
SPLIT = (
    "SELECT (SELECT count(*) FROM conversations c JOIN conversations_archive a"
    "   ON a.user_id = c.user_id AND a.id = c.id)"
    " + (SELECT count(*) FROM messages_archive m JOIN conversations c"
    "   ON c.user_id = m.user_id AND c.id = m.conversation_id)"
    " + (SELECT count(*) FROM messages m JOIN conversations_archive a"
    "   ON a.user_id = m.user_id AND a.id = m.conversation_id)"
)


def test_sigkill_during_restore_leaves_each_conversation_once_and_a_rerun_finishes(citus_migrated_db, cli):
    db = citus_migrated_db
    populate(db, conversations=800, users=40)
    run_json(cli, db, "archive", "--older-than", "60d")
    before = (checksum(db, UNION), checksum(db, MUNION))
    chosen = sorted(ids(db, "SELECT id FROM conversations_archive"), key=str)
    arguments = [arg for i in chosen for arg in ("--conversation", str(i))]
    killed = killed_in_the_middle(db, "archive", "restore", *arguments, "--batch-size", "2")
    # Each conversation once, hot or archived, with its messages beside it; the run was
    # killed half-way.
    assert (checksum(db, UNION), checksum(db, MUNION)) == before
    assert db.scalar(SPLIT) == 0
    restored = ids(db, "SELECT id FROM conversations WHERE id = ANY(:i)", i=chosen)
    assert restored and len(restored) < len(chosen)

    out = run_json(cli, db, "archive", "restore", *arguments)
    assert out["took_over"] == [killed]
    assert (out["outcome"], out["complete"]) == ("succeeded", True)
    assert {uuid.UUID(i) for i in out["already_hot"]} == restored
    assert out["done"]["conversations"] == len(chosen) - len(restored)
    assert db.scalar("SELECT count(*) FROM conversations_archive") == 0
    assert db.scalar("SELECT count(*) FROM messages_archive") == 0
    assert (checksum(db, UNION), checksum(db, MUNION)) == before
    assert db.scalar(SPLIT) == 0
    runs = db.engine.connect().execute(text("SELECT outcome FROM chatdb_runs ORDER BY id")).scalars().all()
    assert runs == ["succeeded", "interrupted", "succeeded"]


def test_archived_rows_the_application_holds_are_skipped_then_restored(citus_migrated_db, cli):
    """The application holds the first of a user's archived conversations (in the order
    the restore takes them): the restore's batches pass over it and restore the rest, and
    a later sweep restores it, with its messages, once it is let go."""
    db = citus_migrated_db
    populate(db)
    run_json(cli, db, "archive", "--older-than", "60d")
    user = db.scalar(
        "SELECT user_id FROM conversations_archive GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1"
    )
    archived = db.scalar("SELECT count(*) FROM conversations_archive WHERE user_id = :u", u=user)
    messages = db.scalar("SELECT count(*) FROM messages_archive WHERE user_id = :u", u=user)
    held = db.scalar("SELECT id FROM conversations_archive WHERE user_id = :u ORDER BY id LIMIT 1", u=user)
    held_messages = db.scalar("SELECT count(*) FROM messages_archive WHERE conversation_id = :i", i=held)
    assert archived > 5 and held_messages > 0
    holder = db.engine.connect()
    holder.begin()
    holder.execute(
        text("SELECT 1 FROM conversations_archive WHERE user_id = :u AND id = :i FOR UPDATE"),
        {"u": user, "i": held},
    )
    process = _start(db, "archive", "restore", "--user", user, "--batch-size", "2", "--json")
    try:
        deadline = time.monotonic() + 60
        while db.scalar("SELECT count(*) FROM conversations_archive WHERE user_id = :u", u=user) > 1:
            assert time.monotonic() < deadline, "the restore made no progress"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        # Everything else is back; the held conversation waits in the archive, whole.
        assert ids(db, "SELECT id FROM conversations_archive WHERE user_id = :u", u=user) == {held}
        assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=held) == 0
        assert db.scalar("SELECT count(*) FROM messages_archive WHERE user_id = :u", u=user) == held_messages
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    out = json.loads(stdout)
    assert (out["ok"], out["complete"]) == (True, True)
    assert out["done"] == {"conversations": archived, "messages": messages}
    assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=held) == 1
    assert db.scalar("SELECT count(*) FROM messages WHERE conversation_id = :i", i=held) == held_messages
    assert db.scalar("SELECT count(*) FROM conversations_archive WHERE user_id = :u", u=user) == 0
    assert db.scalar("SELECT count(*) FROM messages_archive WHERE user_id = :u", u=user) == 0


class BatchStatements:
    """Every statement each batch's transaction sends, with its parameters, recorded from
    the engine's events: a batch's transaction is one that starts with the batch's
    settings (``statements.batch_settings``)."""

    def __init__(self, engine) -> None:
        self.batches: list[list[tuple[str, object]]] = []
        self.open: dict[int, list[tuple[str, object]]] = {}
        self.lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self.before)
        event.listen(engine, "commit", self.end)
        event.listen(engine, "rollback", self.end)

    def before(self, connection, cursor, statement, parameters, context, executemany) -> None:
        key = id(connection)
        with self.lock:
            if "set_config('lock_timeout'" in statement:
                self.open[key] = []
            elif key in self.open:
                self.open[key].append((statement, parameters))

    def end(self, connection) -> None:
        with self.lock:
            batch = self.open.pop(id(connection), None)
            if batch:
                self.batches.append(batch)


def tasks(connection, statement: str, parameters) -> list[str]:
    """The lines of the distributed plan of ``statement`` that say how Citus runs it: its
    task counts and subplans (none for a statement on the coordinator's own tables)."""
    plan = connection.exec_driver_sql("EXPLAIN " + statement, parameters).scalars().all()
    return [line.strip() for line in plan if "Task Count" in line or "Subplan" in line]


def test_every_statement_of_every_batch_is_one_router_task(citus_migrated_db, tmp_path):
    """Inside a batch's transaction (which holds locks), each statement on the
    distributed tables runs on one shard, whole, in one round trip: no read over every
    shard (the pass's users are found before its batches), no subplan carried through
    the coordinator. And each batch sends few of them: the pick, and for archive and
    restore three statements more (and the export's lines), for a purge one."""
    db = citus_migrated_db
    populate(db)
    engine = engine_for(db)
    recorder = BatchStatements(engine)
    try:
        plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
        archived = lifecycle.archive(engine, plan, lifecycle.RunOptions(batch_size=9), tmp_path / "a.jsonl")
        archive_batches = len(recorder.batches)
        plan = lifecycle.plan_purge(engine, lifecycle.parse_duration("90d"), lifecycle.parse_duration("10d"))
        purged = lifecycle.purge(engine, plan, lifecycle.RunOptions(batch_size=9))
    finally:
        engine.dispose()
    assert archived.done.conversations and purged.done.archive_conversations and purged.done.messages
    assert archive_batches >= archived.batches > 2
    assert len(recorder.batches) >= archived.batches + purged.batches
    data = ("conversations", "messages")
    with db.engine.connect() as connection:
        for number, batch in enumerate(recorder.batches):
            on_shards = [
                (statement, parameters)
                for statement, parameters in batch
                if any(f'{table}"' in statement or f"{table} " in statement for table in data)
            ]
            exporting = number < archive_batches
            assert len(on_shards) <= (5 if exporting else 2), batch
            for statement, parameters in on_shards:
                if statement.startswith("DISCARD"):
                    continue
                assert tasks(connection, statement, parameters) == ["Task Count: 1"], statement
            connection.rollback()


def test_a_message_changed_while_archive_takes_it_is_archived_as_changed(citus_migrated_db, cli):
    """The application edits a message of an idle conversation and holds it (its
    transaction open) while archive comes for it: the batch waits for that lock (the
    copy locks the messages it copies), so the archive holds the edited message, never
    the version before, and the hot table nothing of it."""
    db = citus_migrated_db
    populate(db)
    user, conversation, message = (
        db.engine.connect()
        .execute(
            text(
                "SELECT m.user_id, m.conversation_id, m.id FROM messages m JOIN conversations c"
                " ON c.user_id = m.user_id AND c.id = m.conversation_id"
                " WHERE c.updated_at < now() - interval '200 days' AND c.deleted_at IS NULL"
                " ORDER BY m.id LIMIT 1"
            )
        )
        .one()
    )
    messages_before = db.scalar("SELECT count(*) FROM messages") + db.scalar(
        "SELECT count(*) FROM messages_archive"
    )
    holder = db.engine.connect()
    holder.begin()
    holder.execute(
        text("UPDATE messages SET content = 'edited while archived' WHERE user_id = :u AND id = :i"),
        {"u": user, "i": message},
    )
    process = _start(db, "archive", "--older-than", "60d", "--json")
    try:
        # Commit the edit the moment the archive waits for it on the worker.
        deadline = time.monotonic() + 60
        waiting = 0
        while not waiting:
            assert time.monotonic() < deadline, "the archive never waited for the held message"
            assert process.poll() is None, process.communicate()
            for worker in db.cluster.workers:
                with psycopg.connect(worker.conninfo(db.name), autocommit=True) as connection:
                    waiting += connection.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    ).fetchone()[0]
            time.sleep(0.01)
        holder.commit()
    finally:
        holder.close()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["ok"]
    assert db.scalar("SELECT count(*) FROM messages WHERE id = :i", i=message) == 0
    assert (
        db.scalar("SELECT content FROM messages_archive WHERE id = :i", i=message) == "edited while archived"
    )
    assert db.scalar("SELECT count(*) FROM conversations_archive WHERE id = :i", i=conversation) == 1
    total = db.scalar("SELECT count(*) FROM messages") + db.scalar("SELECT count(*) FROM messages_archive")
    assert total == messages_before


#: Two ways an operator can leave the tables distributed otherwise than chatdb needs.
LAYOUTS = {
    "not co-located": (
        ["SELECT update_distributed_table_colocation('messages_archive', colocate_with => 'none')"],
        "messages_archive is not co-located with the other tables distributed by user_id",
        "hint: run SELECT update_distributed_table_colocation('messages_archive', colocate_with =>"
        " 'conversations'); then the command again",
    ),
    "not distributed": (
        [
            "ALTER TABLE messages_archive DROP CONSTRAINT fk_messages_archive_conversation_owner",
            "SELECT undistribute_table('messages_archive')",
        ],
        "messages_archive is not distributed on this Citus cluster while conversations is",
        "hint: run chatdb migrate, which distributes them",
    ),
}
COMMANDS = {
    "archive": ["archive", "--older-than", "60d", "--yes"],
    "archive dry run": ["archive", "--older-than", "60d", "--dry-run"],
    "restore": ["archive", "restore", "--user", "u1"],
    "purge": ["purge", "--older-than", "90d", "--yes"],
    "purge dry run": ["purge", "--older-than", "90d", "--dry-run"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_layout_that_spreads_a_users_rows_is_refused_before_anything_runs(
    citus_migrated_db, cli, layout, command
):
    """Each batch is one router task per statement only when the four tables are
    distributed by user_id and co-located. Otherwise archive, restore and purge refuse,
    dry runs too, before they take the guard, with the statement that fixes the layout."""
    db = citus_migrated_db
    populate(db)
    statements, error, hint = LAYOUTS[layout]
    for statement in statements:
        db.execute(statement)
    before = state(db)
    result = cli(*COMMANDS[command], "--database-url", db.cli_url)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {error}"), result.stderr
    assert lines[1] == hint
    assert state(db) == before
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0
