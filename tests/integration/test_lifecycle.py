"""`chatdb archive`, `chatdb archive restore` and `chatdb purge`: exactly the predicted
rows, nothing lost, safe beside a writing application, after SIGKILL and against a
second run."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from chatdb import db as db_module
from chatdb import lifecycle, patterns, schema
from chatdb.errors import StateError

# --- a database state with every case on both sides of the cutoffs ---------------------------

RETENTION_DAYS = 90
GRACE_DAYS = 30


def populate(db, conversations: int = 400, users: int = 12) -> None:
    """Conversations idle for 0..399 days (clear of the cutoffs by at least an hour), one
    in seven soft-deleted 0..59 days ago, one to six messages each, one in five of those
    soft-deleted 0..59 days ago; an application user with no conversations; and a share
    of the old ones already in the archive."""
    db.execute(
        "INSERT INTO users (id, email, name) SELECT 'u' || g, 'u' || g || '@example.com', 'User ' || g"
        " FROM generate_series(1, :users) g",
        users=users,
    )
    db.execute("INSERT INTO users (id, email) VALUES ('app-only', 'app@example.com')")
    db.execute(
        """
        INSERT INTO conversations (id, user_id, title, metadata, created_at, updated_at, deleted_at)
        SELECT gen_random_uuid(), 'u' || (g % :users + 1), 'chat ' || g, jsonb_build_object('n', g),
               now() - make_interval(days => g % 400 + 1, hours => 3),
               now() - make_interval(days => g % 400, hours => 3),
               CASE WHEN g % 7 = 0 THEN now() - make_interval(days => g % 60, hours => 2) END
        FROM generate_series(1, :n) g
        """,
        n=conversations,
        users=users,
    )
    db.execute(
        """
        INSERT INTO messages
          (conversation_id, user_id, role, content, metadata, tool_calls, created_at, deleted_at)
        SELECT c.id, c.user_id, CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END,
               'message ' || k || ' of ' || c.title,
               CASE WHEN k % 2 = 0 THEN '{"model": "gpt-4o"}'::jsonb END,
               CASE WHEN k = 2 THEN '[{"name": "add_task"}]'::jsonb END,
               c.created_at + make_interval(mins => k),
               CASE WHEN k % 5 = 0 THEN now() - make_interval(days => (k * 17) % 60, hours => 1) END
        FROM conversations c, generate_series(1, 1 + abs(hashtext(c.id::text)) % 6) k
        """
    )
    # Some old conversations are archived already (moved by hand, as archive would), in
    # statements that Citus takes too (tests/integration/citus/test_lifecycle.py).
    chosen = ids(
        db,
        "SELECT id FROM conversations WHERE updated_at < now() - interval '200 days'"
        " AND deleted_at IS NULL ORDER BY id LIMIT 40",
    )
    params = {"ids": list(chosen)}
    for hot, archive, key in (
        ("conversations", "conversations_archive", "id"),
        ("messages", "messages_archive", "conversation_id"),
    ):
        names = ", ".join(column.name for column in schema.metadata.tables[hot].c)
        db.execute(
            f"INSERT INTO {archive} ({names}) SELECT {names} FROM {hot} WHERE {key} = ANY(:ids)", **params
        )
    db.execute("DELETE FROM conversations WHERE id = ANY(:ids)", **params)


def ids(db, sql: str, **params) -> set:
    with db.engine.connect() as connection:
        return set(connection.execute(text(sql), params).scalars())


def checksum(db, table: str, where: str = "true") -> str:
    """Every column of every row (archived_at aside), in id order."""
    return db.scalar(
        f"SELECT md5(coalesce(string_agg((to_jsonb(t) - 'archived_at')::text, ',' ORDER BY id), ''))"
        f" FROM {table} t WHERE {where}"
    )


def state(db) -> dict[str, set]:
    return {
        "conversations": ids(db, "SELECT id FROM conversations"),
        "messages": ids(db, "SELECT id FROM messages"),
        "conversations_archive": ids(db, "SELECT id FROM conversations_archive"),
        "messages_archive": ids(db, "SELECT id FROM messages_archive"),
    }


def _archive_ahead(db) -> tuple[dict, Engine, lifecycle.Plan, list]:
    """Before an archive of what is idle past 60 days: snapshots of the tables, their
    state, an engine (the caller disposes of it), the plan, and the idle conversations in
    the order the run comes to them."""
    snapshot(db)
    before = state(db)
    engine = engine_for(db)
    plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
    return before, engine, plan, archivable_ids(db, plan.cutoff)


def snapshot(db) -> None:
    """Copies of chatdb's tables as they are now (snap_conversations, ...)."""
    for table in ("conversations", "messages", "conversations_archive", "messages_archive"):
        db.execute(f"CREATE TABLE snap_{table} AS SELECT * FROM {table}")


def predicted_purge(db, cutoff, deleted_cutoff, prefix: str = "") -> dict[str, set]:
    """What a plain SQL query says a purge with these cutoffs deletes (from the tables,
    or from their snapshots with ``prefix="snap_"``)."""
    found = {}
    for parent, child in (("conversations", "messages"), ("conversations_archive", "messages_archive")):
        gone = f"SELECT id FROM {prefix}{parent} WHERE updated_at < :cutoff OR deleted_at < :deleted"
        found[parent] = ids(db, gone, cutoff=cutoff, deleted=deleted_cutoff)
        found[child] = ids(
            db,
            f"SELECT id FROM {prefix}{child} WHERE deleted_at < :deleted OR conversation_id IN ({gone})",
            cutoff=cutoff,
            deleted=deleted_cutoff,
        )
    return found


def predicted_archive(db, cutoff) -> dict[str, set]:
    moved = "SELECT id FROM conversations WHERE updated_at < :cutoff AND deleted_at IS NULL"
    return {
        "conversations": ids(db, moved, cutoff=cutoff),
        "messages": ids(db, f"SELECT id FROM messages WHERE conversation_id IN ({moved})", cutoff=cutoff),
    }


def run_json(cli, db, *args: str) -> dict:
    result = cli(*args, "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def engine_for(db):
    return db_module.connect(db_module.Database(db.url, "test"))


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, seconds",
    [
        ("90d", 90 * 86400),
        ("1d12h", 36 * 3600),
        ("2w", 14 * 86400),
        ("45s", 45),
        ("30m", 1800),
        ("1W", 604800),
    ],
)
def test_durations_are_exact(raw, seconds):
    assert lifecycle.parse_duration(raw).seconds == seconds


@pytest.mark.parametrize("raw", ["90", "d", "90x", "0d", "-5d", "1.5d", "36525d1s", "1d1d", "", "90 days"])
def test_bad_durations_are_refused_with_exit_2(cli, migrated_db, raw):
    result = cli("purge", "--older-than", raw, "--database-url", migrated_db.cli_url)
    assert result.exit_code == 2
    assert "--older-than" in one_error(result)


def test_bad_grace_and_runtime_and_restore_input_exit_2(cli, migrated_db):
    url = migrated_db.cli_url
    for args in (
        ("purge", "--older-than", "90d", "--deleted-grace", "0s"),
        ("archive", "--older-than", "90d", "--max-runtime", "soon"),
        ("archive", "--older-than", "90d", "--export", "out.csv"),
        ("archive", "restore", "--conversation", "not-a-uuid"),
        ("archive", "restore"),
        ("archive",),
    ):
        result = cli(*args, "--database-url", url)
        assert result.exit_code == 2, (args, result.output)
        one_error(result)


def test_unmigrated_database_is_refused(cli, empty_db):
    result = cli("purge", "--older-than", "90d", "--database-url", empty_db.cli_url)
    assert result.exit_code == 1
    assert "chatdb migrate" in result.stderr


# --- two users' rows with the same id -----------------------------------------------------------

SHARED_ID = "00000000-0000-0000-0000-0000000000aa"


def rows(db, sql: str, **params) -> list[tuple]:
    with db.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params).all()]


def two_users_one_id(db, mallorys: str, alices: str = "now()") -> None:
    """Alice's conversation, last active at ``alices``, with a message, and Mallory's with
    the same id (``mallorys``: its updated_at and deleted_at, SQL). Since revision 0007 the
    key of conversations and messages (and their archives) is ``(id, user_id)``: two
    users' rows may share an ``id`` (an application that lets clients choose ids, an
    import, a hostile client that learned another user's conversation id). Every batch
    goes by the whole key."""
    db.execute("INSERT INTO users (id) VALUES ('alice'), ('mallory')")
    db.execute(
        "INSERT INTO conversations (id, user_id, updated_at, deleted_at)"
        f" VALUES (:id, 'alice', {alices}, NULL), (:id, 'mallory', {mallorys})",
        id=SHARED_ID,
    )
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        " VALUES (:id, 'alice', 'user', 'alice keeps this')",
        id=SHARED_ID,
    )


def purged(cli, db) -> dict:
    result = cli("purge", "--older-than", "365d", "--yes", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["done"]


@pytest.mark.parametrize(
    "mallorys",
    ["now(), now() - interval '60 days'", "now() - interval '400 days', NULL"],
    ids=["soft-deleted past the grace period", "idle"],
)
def test_purge_of_a_conversation_deletes_only_that_users(cli, migrated_db, mallorys):
    db = migrated_db
    two_users_one_id(db, mallorys=mallorys)
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        " VALUES (:id, 'mallory', 'user', 'mallory''s')",
        id=SHARED_ID,
    )
    done = purged(cli, db)
    assert (done["conversations"], done["messages"]) == (1, 1)
    assert rows(db, "SELECT user_id FROM conversations") == [("alice",)]
    assert rows(db, "SELECT content FROM messages") == [("alice keeps this",)]


def test_purge_of_a_soft_deleted_message_deletes_only_that_message(cli, migrated_db):
    db = migrated_db
    two_users_one_id(db, mallorys="now(), NULL")
    db.execute(
        "INSERT INTO messages (id, conversation_id, user_id, role, content, deleted_at)"
        " VALUES (:m, :id, 'alice', 'user', 'alice''s message', NULL),"
        " (:m, :id, 'mallory', 'user', 'mallory''s message', now() - interval '60 days')",
        id=SHARED_ID,
        m="00000000-0000-0000-0000-0000000000bb",
    )
    assert purged(cli, db)["messages"] == 1
    assert rows(db, "SELECT content FROM messages ORDER BY 1") == [
        ("alice keeps this",),
        ("alice's message",),
    ]


def test_archive_moves_only_the_idle_conversation_exports_it_once_and_restores_it(cli, migrated_db, tmp_path):
    db = migrated_db
    two_users_one_id(db, mallorys="now() - interval '400 days', NULL")
    export = tmp_path / "out.jsonl"
    result = cli(
        "archive", "--older-than", "180d", "--yes", "--json", "--export", str(export),
        "--database-url", db.cli_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exported"] == 1
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert [(line["conversation"]["user_id"], line["messages"]) for line in lines] == [("mallory", [])]
    assert rows(db, "SELECT user_id FROM conversations") == [("alice",)]
    assert rows(db, "SELECT user_id FROM conversations_archive") == [("mallory",)]
    assert rows(db, "SELECT user_id FROM messages") == [("alice",)]
    # Back by its id: Mallory's comes back, and Alice's hot one is left as it is.
    result = cli("archive", "restore", "--conversation", SHARED_ID, "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert rows(db, "SELECT user_id FROM conversations ORDER BY 1") == [("alice",), ("mallory",)]
    assert rows(db, "SELECT user_id FROM messages") == [("alice",)]


def test_restore_of_a_user_restores_only_that_users_conversations(cli, migrated_db):
    db = migrated_db
    db.execute("INSERT INTO users (id) VALUES ('alice'), ('mallory')")
    db.execute(
        "INSERT INTO conversations_archive (id, user_id) VALUES (:id, 'alice'), (:id, 'mallory')",
        id=SHARED_ID,
    )
    result = cli("archive", "restore", "--user", "mallory", "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert rows(db, "SELECT user_id FROM conversations") == [("mallory",)]
    assert rows(db, "SELECT user_id FROM conversations_archive") == [("alice",)]


def test_restore_of_an_id_two_users_share_restores_each_with_its_own_messages(cli, migrated_db):
    db = migrated_db
    two_users_one_id(db, mallorys="now() - interval '400 days', NULL", alices="now() - interval '400 days'")
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        " VALUES (:id, 'mallory', 'user', 'mallory''s')",
        id=SHARED_ID,
    )
    archived = cli("archive", "--older-than", "180d", "--yes", "--json", "--database-url", db.cli_url)
    assert archived.exit_code == 0, archived.output
    done = json.loads(archived.stdout)["done"]
    assert (done["conversations"], done["messages"]) == (2, 2)
    result = cli("archive", "restore", "--conversation", SHARED_ID, "--json", "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == {"conversations": 2, "messages": 2}, result.stdout
    assert rows(db, "SELECT user_id FROM conversations ORDER BY 1") == [("alice",), ("mallory",)]
    assert rows(db, "SELECT user_id, content FROM messages ORDER BY 1") == [
        ("alice", "alice keeps this"),
        ("mallory", "mallory's"),
    ]
    assert rows(db, "SELECT count(*) FROM conversations_archive") == [(0,)]
    assert rows(db, "SELECT count(*) FROM messages_archive") == [(0,)]


# --- exactly the predicted rows ------------------------------------------------------------------


def purge_exactly_as_predicted(
    db, jobs: int, prepare: Callable[[object], None] | None = None
) -> tuple[lifecycle.RunResult, dict[str, set]]:
    """Purge populate()'s state (changed by ``prepare(db)``, if given) in batches of 7
    with ``jobs`` jobs, and check that it deleted exactly the rows SQL predicts, hot and
    archived, and counted them: a check this file and the Citus tests share. Returns the
    result and the predicted rows."""
    populate(db)
    if prepare is not None:
        prepare(db)
    users_before = checksum(db, "users")
    before = state(db)
    engine = engine_for(db)
    try:
        plan = lifecycle.plan_purge(
            engine, lifecycle.parse_duration(f"{RETENTION_DAYS}d"), lifecycle.parse_duration(f"{GRACE_DAYS}d")
        )
        gone = predicted_purge(db, plan.cutoff, plan.deleted_cutoff)
        result = lifecycle.purge(engine, plan, lifecycle.RunOptions(batch_size=7, jobs=jobs))
    finally:
        engine.dispose()
    after = state(db)
    for table, rows in before.items():
        assert after[table] == rows - gone[table], table
    # Every kind of row was in play, and the archive too.
    assert all(gone[table] for table in gone)
    assert all(after[table] for table in ("conversations", "messages"))
    assert result.done.as_dict() == {
        "conversations": len(gone["conversations"]),
        "messages": len(gone["messages"]),
        "archive_conversations": len(gone["conversations_archive"]),
        "archive_messages": len(gone["messages_archive"]),
    }
    assert result.done.as_dict() == plan.counts.as_dict()
    assert result.batches > 6
    assert checksum(db, "users") == users_before
    return result, gone


@pytest.mark.parametrize("jobs", [1, 3])
def test_purge_deletes_exactly_what_sql_predicts_hot_and_archive(migrated_db, jobs):
    purge_exactly_as_predicted(migrated_db, jobs)
    assert migrated_db.scalar("SELECT count(*) FROM users WHERE id = 'app-only'") == 1


def test_grace_period_keeps_recent_soft_deletes_and_idle_beats_grace(cli, migrated_db):
    db = migrated_db
    db.execute("INSERT INTO users (id) VALUES ('u1')")
    db.execute(
        """
        INSERT INTO conversations (id, user_id, updated_at, deleted_at) VALUES
          ('00000000-0000-0000-0000-000000000001', 'u1', now() - interval '5d', now() - interval '10d'),
          ('00000000-0000-0000-0000-000000000002', 'u1', now() - interval '5d', now() - interval '40d'),
          ('00000000-0000-0000-0000-000000000003', 'u1', now() - interval '100d', now() - interval '1d'),
          ('00000000-0000-0000-0000-000000000004', 'u1', now() - interval '5d', NULL)
        """
    )
    db.execute(
        """
        INSERT INTO messages (id, conversation_id, user_id, role, content, deleted_at) VALUES
          ('10000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000004', 'u1', 'user', 'a',
           now() - interval '40 days'),
          ('10000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000004', 'u1', 'user', 'b',
           now() - interval '10 days'),
          ('10000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-000000000004', 'u1', 'user', 'c',
           NULL)
        """
    )
    out = run_json(cli, db, "purge", "--older-than", "90d", "--deleted-grace", "30d")
    assert out["ok"] and out["done"]["conversations"] == 2 and out["done"]["messages"] == 1
    assert {str(i)[-1] for i in ids(db, "SELECT id FROM conversations")} == {"1", "4"}
    assert {str(i)[-1] for i in ids(db, "SELECT id FROM messages")} == {"2", "3"}


def test_dry_run_counts_equal_the_real_runs_and_change_nothing(cli, migrated_db):
    db = migrated_db
    populate(db)
    before = {table: checksum(db, table) for table in ("conversations", "messages", "conversations_archive")}
    dry = run_json(cli, db, "purge", "--older-than", "90d", "--dry-run")
    assert dry["dry_run"] is True
    assert {table: checksum(db, table) for table in before} == before
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0
    real = run_json(cli, db, "purge", "--older-than", "90d")
    assert real["done"] == dry["planned"]
    assert real["done"]["archive_conversations"] > 0

    dry_archive = run_json(cli, db, "archive", "--older-than", "30d", "--dry-run")
    archived = run_json(cli, db, "archive", "--older-than", "30d")
    assert archived["done"] == dry_archive["planned"]
    assert archived["done"]["conversations"] > 0


def archive_exactly_as_predicted(db, prepare: Callable[[object], None] | None = None) -> dict[str, set]:
    """Archive populate()'s state (changed by ``prepare(db)``, if given) in batches of 9,
    and check that it moved exactly the idle conversations SQL predicts, whole, every
    column unchanged, and counted them. Returns the predicted rows."""
    populate(db)
    if prepare is not None:
        prepare(db)
    engine = engine_for(db)
    try:
        plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
        moving = predicted_archive(db, plan.cutoff)
        moving_sql = ",".join(f"'{i}'" for i in moving["conversations"])
        hot_before = {
            "conversations": checksum(db, "conversations", f"id IN ({moving_sql})"),
            "messages": checksum(db, "messages", f"conversation_id IN ({moving_sql})"),
        }
        archive_before = state(db)
        result = lifecycle.archive(engine, plan, lifecycle.RunOptions(batch_size=9))
    finally:
        engine.dispose()
    after = state(db)
    assert after["conversations"] == archive_before["conversations"] - moving["conversations"]
    assert after["messages"] == archive_before["messages"] - moving["messages"]
    assert after["conversations_archive"] == archive_before["conversations_archive"] | moving["conversations"]
    assert after["messages_archive"] == archive_before["messages_archive"] | moving["messages"]
    # Rows moved unchanged: every column, every row.
    assert checksum(db, "conversations_archive", f"id IN ({moving_sql})") == hot_before["conversations"]
    assert checksum(db, "messages_archive", f"conversation_id IN ({moving_sql})") == hot_before["messages"]
    assert result.done.conversations == len(moving["conversations"]) > 0
    assert result.done.messages == len(moving["messages"]) > 0
    # Soft-deleted conversations wait for purge.
    assert db.scalar("SELECT count(*) FROM conversations_archive WHERE deleted_at IS NOT NULL") == 0
    assert (
        db.scalar(
            "SELECT count(*) FROM conversations WHERE updated_at < :c AND deleted_at IS NULL", c=plan.cutoff
        )
        == 0
    )
    return moving


def test_archive_moves_exactly_the_idle_conversations_whole(migrated_db):
    archive_exactly_as_predicted(migrated_db)


def flag_some_archived(db) -> None:
    """The application's own ``status = 'archived'`` on a share of the conversations, in
    the hot and the archive tables, idle and recent alike."""
    db.execute("UPDATE conversations SET status = 'archived' WHERE abs(hashtext(id::text)) % 3 = 0")
    db.execute("UPDATE conversations_archive SET status = 'archived' WHERE abs(hashtext(id::text)) % 2 = 0")


def statuses(db) -> dict:
    """Each conversation's status, hot or archived."""
    return dict(
        rows(
            db, "SELECT id, status FROM conversations UNION ALL SELECT id, status FROM conversations_archive"
        )
    )


@pytest.mark.parametrize("command", ["archive", "purge"])
def test_the_applications_archived_status_is_neither_read_nor_changed(migrated_db, command):
    """README: ``status = 'archived'`` (the application's UI flag) is neither read nor
    changed. With the flag on idle and recent conversations, hot and archived, each
    command takes exactly what it takes without it (the predicted-set checks, which never
    look at status), and every conversation left, where it is now, has the status it had."""
    db = migrated_db
    before: dict = {}

    def flag(db) -> None:
        flag_some_archived(db)
        before.update(statuses(db))

    if command == "archive":
        taken = archive_exactly_as_predicted(db, prepare=flag)["conversations"]
    else:
        _, gone = purge_exactly_as_predicted(db, 2, prepare=flag)
        taken = gone["conversations"] | gone["conversations_archive"]
    flagged = {i for i, status in before.items() if status == "archived"}
    # The flag is on both sides of the cutoff, and off on both sides too.
    assert taken & flagged and taken - flagged
    assert (before.keys() - taken) & flagged and (before.keys() - taken) - flagged
    left = before if command == "archive" else {i: s for i, s in before.items() if i not in taken}
    assert statuses(db) == left


@pytest.mark.parametrize("command", ["archive", "purge"])
def test_a_row_that_moves_on_disk_during_the_run_is_still_taken_in_its_newest_version(migrated_db, command):
    """Idle conversations go in physical order. One renamed while the run goes (it stays
    idle) gets a new row version elsewhere in the table, possibly behind the run's
    position: the sweep that follows the pass takes it all the same."""
    db = migrated_db
    populate(db)
    # Room on the first page (the conversations there that stay), none on the others
    # but the last: the renamed row's new version goes to the first page, behind the run.
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM FULL conversations"))
        connection.execute(
            text("DELETE FROM conversations WHERE ctid < '(1,0)' AND updated_at > now() - interval '60 days'")
        )
        connection.execute(text("VACUUM conversations"))
    # An idle conversation on a full page far from where the run starts.
    mover = db.scalar(
        "SELECT id FROM conversations WHERE updated_at < now() - interval '60 days' AND deleted_at IS NULL"
        " AND ctid < (SELECT CAST(format('(%s,0)', max((ctid::text::point)[0])) AS tid) FROM conversations)"
        " ORDER BY ctid DESC LIMIT 1"
    )
    block = db.scalar("SELECT (ctid::text::point)[0] FROM conversations WHERE id = :i", i=mover)
    renamed = []

    def rename(done) -> None:
        if not renamed:
            db.execute("UPDATE conversations SET title = 'renamed mid-run' WHERE id = :i", i=mover)
            renamed.append(
                db.scalar("SELECT (ctid::text::point)[0] FROM conversations WHERE id = :i", i=mover)
            )

    engine = engine_for(db)
    try:
        if command == "archive":
            plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
            expected = predicted_archive(db, plan.cutoff)
            options = lifecycle.RunOptions(batch_size=5, jobs=1, progress=rename)
            result = lifecycle.archive(engine, plan, options)
        else:
            plan = lifecycle.plan_purge(
                engine, lifecycle.parse_duration("60d"), lifecycle.parse_duration("30d")
            )
            gone = predicted_purge(db, plan.cutoff, plan.deleted_cutoff)
            options = lifecycle.RunOptions(batch_size=5, jobs=1, progress=rename)
            result = lifecycle.purge(engine, plan, options)
    finally:
        engine.dispose()
    assert renamed and renamed[0] < block, (renamed, block)  # it moved behind the run
    if command == "archive":
        assert mover in expected["conversations"]
        assert result.done.conversations == len(expected["conversations"])
        assert (
            db.scalar("SELECT title FROM conversations_archive WHERE id = :i", i=mover) == "renamed mid-run"
        )
        assert ids(db, "SELECT id FROM conversations WHERE id = :i", i=mover) == set()
    else:
        assert mover in gone["conversations"]
        assert result.done.conversations == len(gone["conversations"])
        assert ids(db, "SELECT id FROM conversations WHERE id = :i", i=mover) == set()


def create_pause_at(db) -> None:
    """``pause_at(t, target)``, true, and when ``t`` is ``target`` only once advisory lock
    4242 is free: added to a batch's window condition (``phases(window=...)``), it holds
    the batch's statement on that row after its snapshot and before its lock, while the
    test holds the lock (``wait_until_paused``). The wait is not the batch's lock wait:
    its lock_timeout is set aside for it, and put back."""
    db.execute(
        """
        CREATE FUNCTION pause_at(t tid, target tid) RETURNS boolean LANGUAGE plpgsql AS $$
        DECLARE
            batch_lock_timeout text := current_setting('lock_timeout');
        BEGIN
            IF t = target THEN
                PERFORM set_config('lock_timeout', '0', true);
                PERFORM pg_advisory_lock_shared(4242);
                PERFORM pg_advisory_unlock_shared(4242);
                PERFORM set_config('lock_timeout', batch_lock_timeout, true);
            END IF;
            RETURN true;
        END $$
        """
    )


def wait_until_paused(db, run: threading.Thread) -> None:
    """Wait until a statement waits in ``pause_at`` (for advisory lock 4242)."""
    deadline = time.monotonic() + 30
    while not db.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
        assert time.monotonic() < deadline and run.is_alive()
        time.sleep(0.02)


@pytest.mark.parametrize("change", ["rename", "message without the bump"])
@pytest.mark.parametrize("track_counts", ["on", "off"])
def test_a_conversation_changed_while_the_purge_statement_runs_goes_whole(migrated_db, track_counts, change):
    """The race of one purge statement: a conversation renamed (still idle) after the
    statement took its snapshot and before it locked the row is locked in a version the
    snapshot cannot see. It must go whole with its messages, or stay whole; never lose
    its messages and stay. A message added then without bumping updated_at (against
    the application's contract) goes with it and is counted. The statement is paused on
    that row (an advisory lock the test holds, waited for by a function added to its
    window condition, through purge's ``phases``) while the change commits."""
    db = migrated_db
    populate(db)
    create_pause_at(db)
    # The first idle conversation on disk, taken by the run's first batch.
    with db.engine.connect() as connection:
        target, where = connection.execute(
            text(
                "SELECT id, ctid::text FROM conversations c WHERE updated_at < now() - interval '90 days'"
                " AND EXISTS (SELECT FROM messages m WHERE m.conversation_id = c.id) ORDER BY ctid LIMIT 1"
            )
        ).one()
    messages_before = db.scalar("SELECT count(*) FROM messages WHERE conversation_id = :i", i=target)
    # Room in the first window of blocks, so that its new version stays there.
    window = lifecycle.FIRST_WINDOW_BLOCKS
    db.execute(
        f"DELETE FROM conversations WHERE updated_at > now() - interval '60 days' AND ctid < '({window},0)'"
    )
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM conversations"))
    snapshot(db)

    url = db.url.update_query_dict({"options": f"-c track_counts={track_counts}"})
    engine = db_module.connect(db_module.Database(url, "test"))
    batches = []
    holder = db.engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(4242)"))
    try:
        plan = lifecycle.plan_purge(engine, lifecycle.parse_duration("90d"), lifecycle.parse_duration("30d"))
        options = lifecycle.RunOptions(
            jobs=1, progress=batches.append, should_stop=lambda: "interrupted" if batches else None
        )
        paused = lifecycle.purge_phases(plan, window=lifecycle.WINDOW + f" AND pause_at(ctid, '{where}')")
        outcome = []
        run = threading.Thread(
            target=lambda: outcome.append(lifecycle.purge(engine, plan, options, phases=paused))
        )
        run.start()
        wait_until_paused(db, run)
        if change == "rename":
            db.execute("UPDATE conversations SET title = 'renamed mid-statement' WHERE id = :i", i=target)
            moved_to = db.scalar("SELECT ctid::text FROM conversations WHERE id = :i", i=target)
            # A new version, in the batch's window.
            assert moved_to != where and int(moved_to.strip("()").split(",")[0]) < window
            added = 0
        else:
            db.execute(
                "INSERT INTO messages (conversation_id, user_id, role, content)"
                " SELECT id, user_id, 'system', 'late' FROM conversations WHERE id = :i",
                i=target,
            )
            added = 1
        holder.execute(text("SELECT pg_advisory_unlock(4242)"))
        run.join(30)
    finally:
        holder.close()
        engine.dispose()
    assert outcome and outcome[0].stopped_by == "interrupted"  # after the one batch
    kept = bool(ids(db, "SELECT id FROM conversations WHERE id = :i", i=target))
    left = db.scalar("SELECT count(*) FROM messages WHERE conversation_id = :i", i=target)
    assert (kept, left) in {(True, messages_before + added), (False, 0)}  # whole, either way
    assert not kept  # taken by the batch that locked it
    # Counted exactly: the batch's counts are what left the tables.
    done = outcome[0].done
    gone = {
        "conversations": db.scalar(
            "SELECT (SELECT count(*) FROM snap_conversations) - count(*) FROM conversations"
        ),
        "messages": db.scalar("SELECT (SELECT count(*) FROM snap_messages) - count(*) FROM messages") + added,
    }
    assert gone == {"conversations": done.conversations, "messages": done.messages}


def test_foreign_key_checks_stop_scanning_the_archive_table_as_it_grows(migrated_db):
    """The first archive into empty (vacuumed) archive tables: the foreign-key check of
    each moved message must not keep scanning conversations_archive whole, the plan its
    session made while that table was nearly empty. Autovacuum, which would have the
    check planned afresh when it happens to analyse the table, is kept off it."""
    db = migrated_db
    populate(db, conversations=3000, users=60)
    db.execute("DELETE FROM conversations_archive")  # its messages go with it
    db.execute("ALTER TABLE conversations_archive SET (autovacuum_enabled = off)")
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE conversations_archive, messages_archive"))
    engine = engine_for(db)
    try:
        plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
        moved = lifecycle.archive(engine, plan, lifecycle.RunOptions(jobs=1)).done.messages
    finally:
        engine.dispose()
    assert moved > 5000
    # One scan of conversations_archive per moved message; the run's sessions report
    # theirs as they end.
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'conversations_archive'"
    deadline = time.monotonic() + 30
    while True:
        with db.engine.connect() as connection:
            seq_scan, idx_scan = connection.execute(text(scans)).one()
        if seq_scan + idx_scan >= moved or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seq_scan + idx_scan >= moved
    # Planned afresh as the table doubles, the check scans it whole only while it is
    # small (a fifth of the moves here, a fraction of a percent at a million messages);
    # a plan kept from the start scans it for every message.
    assert seq_scan < moved / 2, (seq_scan, idx_scan)


def test_archive_restore_round_trip_checksums(cli, migrated_db):
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")  # start from an empty archive
    before = {table: checksum(db, table) for table in ("conversations", "messages")}
    out = run_json(cli, db, "archive", "--older-than", "60d", "--batch-size", "11")
    assert out["done"]["conversations"] > 0
    assert checksum(db, "conversations") != before["conversations"]
    archived = sorted(ids(db, "SELECT id FROM conversations_archive"), key=str)
    one_by_one = run_json(
        cli, db, "archive", "restore", *[arg for i in archived[:5] for arg in ("--conversation", str(i))]
    )
    assert one_by_one["done"]["conversations"] == 5
    for user in sorted(ids(db, "SELECT DISTINCT user_id FROM conversations_archive")):
        run_json(cli, db, "archive", "restore", "--user", user)
    assert db.scalar("SELECT count(*) FROM conversations_archive") == 0
    assert db.scalar("SELECT count(*) FROM messages_archive") == 0
    assert {table: checksum(db, table) for table in ("conversations", "messages")} == before


def test_restore_of_a_conversation_found_nowhere_restores_nothing(cli, migrated_db):
    db = migrated_db
    populate(db)
    archived = db.scalar("SELECT id FROM conversations_archive LIMIT 1")
    unknown = uuid.uuid4()
    before = checksum(db, "conversations_archive")
    result = cli(
        "archive",
        "restore",
        "--conversation",
        str(archived),
        "--conversation",
        str(unknown),
        "--database-url",
        db.cli_url,
    )
    assert result.exit_code == 1
    error = one_error(result)
    assert "in neither the archive nor the hot tables" in error and str(unknown) in error
    assert str(archived) not in error
    assert checksum(db, "conversations_archive") == before


def test_restore_summary_counts_what_came_back(cli, migrated_db):
    db = migrated_db
    populate(db)
    user = db.scalar(
        "SELECT user_id FROM conversations_archive GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"
    )
    conversations = db.scalar("SELECT count(*) FROM conversations_archive WHERE user_id = :u", u=user)
    messages = db.scalar("SELECT count(*) FROM messages_archive WHERE user_id = :u", u=user)
    result = cli("archive", "restore", "--user", user, "--database-url", db.cli_url)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("restored")]
    assert rows == [
        ["restored", "│", "conversations", "│", f"{conversations:,}"],
        ["restored", "│", "messages", "│", f"{messages:,}"],
    ], result.stdout
    empty = cli("archive", "restore", "--user", " ", "--database-url", db.cli_url)
    assert empty.exit_code == 2
    assert "--user" in one_error(empty)


def test_a_stopped_restore_run_again_finishes(cli, migrated_db):
    """A restore stopped after some batches left those conversations hot, whole; the
    same command run again restores the rest and leaves them as they are."""
    db = migrated_db
    populate(db)
    named = sorted(ids(db, "SELECT id FROM conversations_archive"), key=str)[:6]
    arguments = [arg for i in named for arg in ("--conversation", str(i))]
    expected_messages = db.scalar(
        "SELECT count(*) FROM messages_archive WHERE conversation_id = ANY(:ids)", ids=named
    )
    # The state such a run leaves: its first batch (two of the conversations) restored.
    first = run_json(cli, db, "archive", "restore", *arguments[:4])
    assert first["done"]["conversations"] == 2
    again = run_json(cli, db, "archive", "restore", *arguments)
    assert again["outcome"] == "succeeded"
    assert again["done"]["conversations"] == 4
    assert sorted(again["already_hot"]) == sorted(str(i) for i in named[:2])
    assert first["done"]["messages"] + again["done"]["messages"] == expected_messages
    assert ids(db, "SELECT id FROM conversations WHERE id = ANY(:ids)", ids=named) == set(named)
    assert db.scalar("SELECT count(*) FROM conversations_archive WHERE id = ANY(:ids)", ids=named) == 0
    assert (
        db.scalar("SELECT count(*) FROM messages_archive WHERE conversation_id = ANY(:ids)", ids=named) == 0
    )
    text_result = cli("archive", "restore", *arguments, "--database-url", db.cli_url)
    assert text_result.exit_code == 0, text_result.output
    assert "6 of the given conversations were already in the hot tables" in text_result.output


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_export_holds_exactly_the_moved_conversations_and_messages(cli, migrated_db, tmp_path, suffix):
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / f"archive{suffix}"
    # A crash left half a batch at the end of an earlier export: it is cut off.
    earlier = b'{"conversation": {"id": "x"}, "messages": []}\n'
    export.write_bytes(
        gzip.compress(earlier) + gzip.compress(b"partial")[:15]
        if suffix.endswith("gz")
        else earlier + b'{"conv'
    )
    out = run_json(cli, db, "archive", "--older-than", "100d", "--export", str(export), "--batch-size", "17")
    raw = gzip.decompress(export.read_bytes()) if suffix.endswith("gz") else export.read_bytes()
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines[0] == json.loads(earlier)
    exported = lines[1:]
    assert out["exported"] == len(exported) == out["done"]["conversations"]
    assert {uuid.UUID(line["conversation"]["id"]) for line in exported} == ids(
        db, "SELECT id FROM conversations_archive"
    )
    assert {uuid.UUID(m["id"]) for line in exported for m in line["messages"]} == ids(
        db, "SELECT id FROM messages_archive"
    )
    # Each line is the conversation as it was, with its messages in order.
    for line in exported:
        conversation = line["conversation"]
        row = db.scalar(
            "SELECT (to_jsonb(c) - 'archived_at')::text FROM conversations_archive c WHERE id = :i",
            i=conversation["id"],
        )
        assert json.loads(row) == conversation
        times = [m["created_at"] for m in line["messages"]]
        assert times == sorted(times)


# --- running beside the application ----------------------------------------------------------------


def test_a_conversation_written_to_during_the_purge_is_never_purged(migrated_db):
    db = migrated_db
    populate(db, conversations=1500)
    cutoff_sql = "now() - interval '90 days'"
    # Idle, and not soft-deleted (a soft-deleted conversation past its grace period goes
    # whatever its activity: the user deleted it).
    eligible = ids(
        db,
        f"SELECT id FROM conversations WHERE updated_at < {cutoff_sql} - interval '1 hour'"
        " AND deleted_at IS NULL",
    )
    owners = dict(
        (row_id, user)
        for row_id, user in db.engine.connect().execute(text("SELECT id, user_id FROM conversations")).all()
    )
    # The writer works from the newest idle conversations down, the purge from the oldest up.
    targets = sorted(eligible, key=lambda i: str(i))
    written: set = set()
    failed: list = []
    done = threading.Event()

    def writer() -> None:
        engine = db.engine
        for conversation_id in targets:
            if done.is_set():
                break
            try:
                with engine.connect() as connection:
                    patterns.add_message(
                        connection, conversation_id, owners[conversation_id], "user", "still here?"
                    )
                    connection.commit()
                written.add(conversation_id)
            except Exception as exc:  # the purge deleted it first: the insert fails
                failed.append(type(exc).__name__)
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    engine = engine_for(db)
    try:
        plan = lifecycle.plan_purge(engine, lifecycle.parse_duration("90d"), lifecycle.parse_duration("30d"))
        thread.start()
        time.sleep(0.05)
        result = lifecycle.purge(engine, plan, lifecycle.RunOptions(batch_size=3))
    finally:
        done.set()
        thread.join()
        engine.dispose()
    assert written, "the writer never wrote while the purge ran"
    assert result.done.conversations > 0
    survivors = ids(db, "SELECT id FROM conversations")
    assert written <= survivors
    # And the purge did not stop short: what nobody wrote to is gone.
    gone_by_rule = ids(
        db,
        "SELECT id FROM conversations WHERE updated_at < :c OR deleted_at < :d",
        c=plan.cutoff,
        d=plan.deleted_cutoff,
    )
    assert not gone_by_rule


def test_rows_locked_by_the_application_are_visited_again_and_a_second_run_is_refused(cli, migrated_db):
    db = migrated_db
    populate(db)
    locked_id = db.scalar(
        "SELECT id FROM conversations WHERE updated_at < now() - interval '200 days'"
        " ORDER BY updated_at LIMIT 1"
    )
    holder = db.engine.connect()
    holder.begin()
    holder.execute(text("SELECT 1 FROM conversations WHERE id = :i FOR UPDATE"), {"i": locked_id})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatdb",
            "purge",
            "--older-than",
            "90d",
            "--json",
            "--database-url",
            db.cli_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (
            db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '90 days'") > 1
        ):
            assert time.monotonic() < deadline, "the purge made no progress"
            time.sleep(0.05)
        second = cli("archive", "--older-than", "90d", "--database-url", db.cli_url)
        assert second.exit_code == 1
        message = one_error(second)
        assert "another archive or purge run is in progress: purge run" in message
        assert f"pid {process.pid}" in message
        time.sleep(0.3)
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    out = json.loads(stdout)
    assert out["ok"]
    assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=locked_id) == 0
    assert db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '90 days'") == 0


def test_rows_that_stay_locked_stop_the_run_with_its_summary_and_exit_1(cli, migrated_db):
    """The rows left are held by another session for the whole run: after its sweeps the
    run stops as any stop does, with what it did counted, recorded and shown, and what is
    left; it exits 1, and a later run takes the rest."""
    db = migrated_db
    populate(db)
    locked_id = db.scalar(
        "SELECT id FROM conversations WHERE updated_at < now() - interval '200 days'"
        " ORDER BY updated_at LIMIT 1"
    )
    purged = (
        "SELECT id FROM conversations WHERE updated_at < now() - interval '90 days'"
        " OR deleted_at < now() - interval '30 days'"
    )
    due = ids(db, purged)
    holder = db.engine.connect()
    holder.begin()
    holder.execute(text("SELECT 1 FROM conversations WHERE id = :i FOR UPDATE"), {"i": locked_id})
    try:
        result = cli("purge", "--older-than", "90d", "--yes", "--json", "--database-url", db.cli_url)
    finally:
        holder.rollback()
        holder.close()
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert (out["ok"], out["complete"], out["stopped_by"]) == (False, False, "locked")
    # Every other phase ran: all that was due went, but the conversation held.
    assert ids(db, purged) == {locked_id}
    assert out["done"]["conversations"] == len(due) - 1
    assert out["remaining"]["conversations"] == 1
    run = db.scalar("SELECT counts FROM chatdb_runs WHERE id = :i", i=out["run_id"])
    assert (run["conversations"], run["stopped_by"], run["complete"]) == (len(due) - 1, "locked", False)
    shown = cli("purge", "--older-than", "90d", "--yes", "--database-url", db.cli_url)
    assert shown.exit_code == 0, shown.output  # nothing holds it now: the rest goes
    assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=locked_id) == 0


def archivable_ids(db, cutoff) -> list:
    """The conversations ``archive`` takes at ``cutoff``, in the order they lie on disk."""
    sql = "SELECT id FROM conversations WHERE updated_at < :c AND deleted_at IS NULL ORDER BY ctid"
    return [row[0] for row in rows(db, sql, c=cutoff)]


def archived_exactly(db, before: dict[str, set], moved: set, added: dict) -> None:
    """The archive moved exactly the conversations ``moved`` (and nothing else) from the
    state ``before``, each whole, with the messages they had; the others stayed hot with
    theirs and the messages ``added`` to them meanwhile (message id: conversation id).
    Nothing is split between the hot and the archive tables."""
    moved_messages = {m for m, c in rows(db, "SELECT id, conversation_id FROM snap_messages") if c in moved}
    after = state(db)
    assert after["conversations"] == before["conversations"] - moved
    assert after["conversations_archive"] == before["conversations_archive"] | moved
    assert after["messages"] == (before["messages"] | added.keys()) - moved_messages
    assert after["messages_archive"] == before["messages_archive"] | moved_messages
    assert not added.keys() & moved_messages
    for hot, cold in (("messages", "conversations_archive"), ("messages_archive", "conversations")):
        on = "(c.id, c.user_id) = (m.conversation_id, m.user_id)"
        assert db.scalar(f"SELECT count(*) FROM {hot} m JOIN {cold} c ON {on}") == 0, hot


def test_a_conversation_written_to_during_the_archive_is_never_archived(migrated_db):
    """README, "Safe beside the application", for ``archive``, which picks its rows by
    statements of its own (``pick_in_window``). A writer adds messages the application's
    way (``patterns.add_message``: the message and the bump of updated_at, one
    transaction) to idle conversations while the archive runs, from the end of the table
    while the archive goes from its start. One more conversation gets its message while a
    batch's statement is held on it (``pause_at``), after the statement's snapshot and
    before its lock: only the re-check under the lock keeps that one out. Every
    conversation written to stays hot with all its messages, nothing is split between
    the hot and the archive tables, and the archive holds exactly the others."""
    db = migrated_db
    populate(db, conversations=1500)
    create_pause_at(db)
    owners = dict(rows(db, "SELECT id, user_id FROM conversations"))
    before, engine, plan, idle = _archive_ahead(db)
    assert set(idle) == predicted_archive(db, plan.cutoff)["conversations"]
    # Held in the first third of the table, which the archive reaches before the writer.
    held = idle[len(idle) // 3]
    where = db.scalar("SELECT ctid::text FROM conversations WHERE id = :i", i=held)
    added: dict = {}  # message id: conversation id, committed
    refused: list = []
    stop = threading.Event()

    def write(connection, conversation_id) -> None:
        message = patterns.add_message(
            connection, conversation_id, owners[conversation_id], "user", "still here?"
        )
        added[message] = conversation_id

    def writer() -> None:
        with db.engine.connect() as connection:
            for conversation_id in reversed(idle):
                if stop.is_set():
                    break
                if conversation_id == held:
                    continue
                try:
                    write(connection, conversation_id)
                except DBAPIError as exc:  # archived first: the message's foreign key fails
                    refused.append(getattr(exc.orig, "sqlstate", None))
                time.sleep(0.002)

    holder = db.engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(4242)"))
    outcome: list = []
    paused = lifecycle.archive_phases(plan, window=lifecycle.WINDOW + f" AND pause_at(ctid, '{where}')")
    run = threading.Thread(
        target=lambda: outcome.append(lifecycle.archive(engine, plan, lifecycle.RunOptions(), phases=paused))
    )
    writing = threading.Thread(target=writer)
    try:
        run.start()
        writing.start()
        wait_until_paused(db, run)
        with db.engine.connect() as connection:
            write(connection, held)
        holder.execute(text("SELECT pg_advisory_unlock(4242)"))
        run.join(60)
    finally:
        stop.set()
        holder.close()
        writing.join(60)
        engine.dispose()
    assert outcome, "the archive did not finish"
    result = outcome[0]
    written = set(added.values())
    assert held in written
    assert len(written) > 1, "the writer never wrote while the archive ran"
    assert set(refused) <= {"23503"}, refused  # the application saw no other error
    moved = set(idle) - written
    archived_exactly(db, before, moved, added)
    assert moved and result.done.conversations == len(moved)
    assert (result.complete, result.stopped_by) == (True, None)


@pytest.mark.parametrize("hold", ["FOR UPDATE", "a message being added"])
def test_an_idle_conversation_the_application_holds_is_visited_again_by_the_same_archive(migrated_db, hold):
    """README: rows skipped because the application held them are visited again before
    the run ends. The first idle conversation on disk, which the run's pass comes to
    first, is held by another session until the pass has taken every other one: locked
    FOR UPDATE and then let go unchanged, it is archived by the same run; given a message
    (the application's two statements, the bump once the pass is by), it stays hot with
    all its messages. Either way the run ends complete, having moved all the others."""
    db = migrated_db
    populate(db)
    before, engine, plan, idle = _archive_ahead(db)
    first = idle[0]
    owner = db.scalar("SELECT user_id FROM conversations WHERE id = :i", i=first)
    added: dict = {}
    holder = db.engine.connect()
    holder.begin()
    if hold == "FOR UPDATE":
        holder.execute(text("SELECT 1 FROM conversations WHERE id = :i FOR UPDATE"), {"i": first})
    else:
        add, bump = patterns.add_message_statements(first, owner, "user", "typing...")
        added[holder.execute(add).scalar_one()] = first
    outcome: list = []
    run = threading.Thread(
        target=lambda: outcome.append(lifecycle.archive(engine, plan, lifecycle.RunOptions(jobs=1)))
    )
    try:
        run.start()
        deadline = time.monotonic() + 60
        while (
            db.scalar(
                "SELECT count(*) FROM conversations WHERE updated_at < :c AND deleted_at IS NULL",
                c=plan.cutoff,
            )
            > 1
        ):
            assert run.is_alive() and time.monotonic() < deadline, "the archive stopped short"
            time.sleep(0.02)
        assert run.is_alive()  # the pass is behind the held conversation; the run sweeps
        if hold == "FOR UPDATE":
            holder.rollback()
        else:
            holder.execute(bump)
            holder.commit()
        run.join(60)
    finally:
        holder.close()
        engine.dispose()
    assert outcome, "the archive did not finish"
    result = outcome[0]
    moved = set(idle) if hold == "FOR UPDATE" else set(idle) - {first}
    archived_exactly(db, before, moved, added)
    assert (result.complete, result.stopped_by) == (True, None)
    assert result.done.conversations == len(moved)


def test_every_batch_runs_with_its_timeouts_local_to_its_transaction(migrated_db):
    """README: every batch sets lock_timeout (500 ms) and statement_timeout, local to its
    transaction. Triggers on the four tables record the settings in force wherever a
    row of them is written, in archive, restore and purge batches alike; afterwards
    the run's sessions, back in the pool, have the server's defaults again."""
    db = migrated_db
    populate(db)
    defaults = tuple(
        rows(db, "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")[0]
    )
    db.execute("CREATE TABLE settings_seen (xid bigint, pid int, lock_timeout text, statement_timeout text)")
    db.execute(
        """
        CREATE FUNCTION settings_seen() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO settings_seen VALUES (txid_current(), pg_backend_pid(),
                current_setting('lock_timeout'), current_setting('statement_timeout'));
            RETURN NULL;
        END $$
        """
    )
    for table in ("conversations", "messages", "conversations_archive", "messages_archive"):
        db.execute(
            f"CREATE TRIGGER settings_seen AFTER INSERT OR DELETE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION settings_seen()"
        )
    user = db.scalar("SELECT user_id FROM conversations_archive GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
    engine = engine_for(db)
    try:
        options = lifecycle.RunOptions(batch_size=20)
        runs = [
            lifecycle.archive(
                engine, lifecycle.plan_archive(engine, lifecycle.parse_duration("60d")), options
            ),
            lifecycle.restore(engine, lifecycle.plan_restore(engine, user_id=user), options),
            lifecycle.purge(
                engine,
                lifecycle.plan_purge(
                    engine, lifecycle.parse_duration("90d"), lifecycle.parse_duration("30d")
                ),
                options,
            ),
        ]
        # Every session the runs left in the pool, at once.
        pooled = [engine.connect() for _ in range(engine.pool.checkedin())]
        try:
            after = {
                tuple(
                    connection.execute(
                        text(
                            "SELECT pg_backend_pid(), current_setting('lock_timeout'),"
                            " current_setting('statement_timeout')"
                        )
                    ).one()
                )
                for connection in pooled
            }
        finally:
            for connection in pooled:
                connection.close()
    finally:
        engine.dispose()
    seen = rows(db, "SELECT xid, pid, lock_timeout, statement_timeout FROM settings_seen")
    assert all(run.batches for run in runs) and all(run.complete for run in runs)
    # Every committed batch wrote rows, each with the batch's settings in force.
    assert len({xid for xid, _, _, _ in seen}) == sum(run.batches for run in runs)
    assert {(lock, statement) for _, _, lock, statement in seen} == {("500ms", "1min")}
    assert defaults != ("500ms", "1min")
    # The sessions that ran the batches have the defaults again.
    assert {pid for _, pid, _, _ in seen} <= {pid for pid, _, _ in after}
    assert {(lock, statement) for _, lock, statement in after} == {defaults}


def test_an_application_that_changes_a_message_then_its_conversation_waits_and_goes_on(migrated_db):
    """README: an application transaction that changes a message and then its
    conversation can meet a batch in a deadlock; the batch's 500 ms lock_timeout ends its
    wait before the default deadlock_timeout (1 s) would pick a side, so the
    application's transaction waits and then goes on.

    The application (A) changes a message of the first idle conversation on disk. The
    run's first batch (B) locks that conversation, copies it to the archive, and is held
    there (a trigger on conversations_archive) until A, changing the conversation, waits
    for B; B then moves the conversation's messages and waits for the one A holds: a
    deadlock, which B's lock timeout ends, 500 ms on. B rolls back and is retried; A's
    statement goes on and A commits, and the conversation, written to, stays hot. The
    order of the waits is fixed by the trigger, not by timing: B starts waiting a few
    milliseconds after A, well inside the 500 ms between B's lock timeout and A's
    deadlock check. (A batch that reached the message more than 500 ms after A began to
    wait would lose that race: A's deadlock check would end A's transaction.)"""
    db = migrated_db
    populate(db)
    assert db.scalar("SHOW deadlock_timeout") == "1s"  # PostgreSQL's default
    before, engine, plan, idle = _archive_ahead(db)
    first = idle[0]
    owner, message = rows(
        db, "SELECT user_id, id FROM messages WHERE conversation_id = :i ORDER BY id LIMIT 1", i=first
    )[0]
    application = db.engine.connect()
    db.execute("CREATE TABLE application_session (pid int)")
    db.execute(
        "INSERT INTO application_session VALUES (:p)",
        p=application.execute(text("SELECT pg_backend_pid()")).scalar(),
    )
    application.commit()
    db.execute("CREATE SEQUENCE batches_held")
    db.execute(
        """
        CREATE FUNCTION held_until_the_application_waits() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('batches_held') = 1 THEN
                WHILE NOT EXISTS (SELECT FROM application_session
                                  WHERE pg_blocking_pids(pid) @> ARRAY[pg_backend_pid()]) LOOP
                    PERFORM pg_sleep(0.001);
                END LOOP;
            END IF;
            RETURN NULL;
        END $$
        """
    )
    db.execute(
        "CREATE TRIGGER held_until_the_application_waits AFTER INSERT ON conversations_archive"
        " FOR EACH STATEMENT EXECUTE FUNCTION held_until_the_application_waits()"
    )
    outcome: list = []
    run = threading.Thread(
        target=lambda: outcome.append(lifecycle.archive(engine, plan, lifecycle.RunOptions(jobs=1)))
    )
    try:
        application.execute(
            text("UPDATE messages SET content = 'edited' WHERE id = :m AND user_id = :u"),
            {"m": message, "u": owner},
        )
        run.start()
        deadline = time.monotonic() + 60
        while not db.scalar("SELECT is_called FROM batches_held"):  # B holds the conversation
            assert run.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        # Waits for B, which then waits for A: the deadlock, ended by B's lock timeout.
        application.execute(
            text("UPDATE conversations SET updated_at = now() WHERE id = :i AND user_id = :u"),
            {"i": first, "u": owner},
        )
        application.commit()
        run.join(60)
    finally:
        application.close()
        engine.dispose()
    assert outcome, "the archive did not finish"
    result = outcome[0]
    assert result.retries >= 1  # the batch gave way
    assert db.scalar("SELECT content FROM messages WHERE id = :m", m=message) == "edited"
    archived_exactly(db, before, set(idle) - {first}, {})
    assert (result.complete, result.stopped_by) == (True, None)


# --- stopping --------------------------------------------------------------------------------------


def _start(db, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chatdb", *args, "--database-url", db.cli_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def killed_in_the_middle(db, *args: str) -> int:
    """Run ``chatdb ARGS``, SIGKILL it once it has committed batches, and return the id of
    its run, still marked running."""
    process = _start(db, *args)
    _wait_for_batches(db, process)
    process.kill()
    process.wait()
    killed = db.scalar("SELECT id FROM chatdb_runs WHERE outcome = 'running'")
    assert killed is not None
    return killed


def _wait_for_batches(db, process, at_least: int = 3) -> None:
    deadline = time.monotonic() + 60
    while True:
        done = db.scalar(
            "SELECT coalesce(sum((counts->>'conversations')::int"
            " + (counts->>'archive_conversations')::int), 0)"
            " FROM chatdb_runs WHERE outcome = 'running'"
        )
        if done >= at_least:
            return
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no batch committed in time"
        time.sleep(0.01)


def test_sigkill_in_the_middle_then_a_rerun_at_once_ends_exactly_as_predicted(cli, migrated_db):
    db = migrated_db
    populate(db, conversations=2000)
    snapshot(db)
    before = state(db)
    killed = killed_in_the_middle(db, "purge", "--older-than", "90d", "--batch-size", "2")
    assert state(db)["conversations"] != before["conversations"]
    # Nothing half-deleted: every remaining message has its conversation.
    orphans = (
        "SELECT count(*) FROM messages m LEFT JOIN conversations c ON c.id = m.conversation_id"
        " WHERE c.id IS NULL"
    )
    assert db.scalar(orphans) == 0

    out = run_json(cli, db, "purge", "--older-than", "90d")
    assert out["took_over"] == [killed]
    assert db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :i", i=killed) == "interrupted"
    gone = predicted_purge(db, out["cutoff"], out["deleted_cutoff"], prefix="snap_")
    after = state(db)
    for table in before:
        assert after[table] == before[table] - gone[table], table
    assert all(gone.values())


def test_sigkill_during_archive_loses_nothing_and_leaves_nothing_half_moved(cli, migrated_db, tmp_path):
    db = migrated_db
    populate(db, conversations=2000)
    union = (
        "(SELECT id, user_id, title, updated_at, deleted_at FROM conversations"
        " UNION ALL SELECT id, user_id, title, updated_at, deleted_at FROM conversations_archive)"
    )
    munion = (
        "(SELECT id, conversation_id, content, created_at, deleted_at FROM messages"
        " UNION ALL SELECT id, conversation_id, content, created_at, deleted_at FROM messages_archive)"
    )
    before = (checksum(db, union), checksum(db, munion))
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / "a.jsonl"
    killed_in_the_middle(db, "archive", "--older-than", "60d", "--batch-size", "2", "--export", str(export))
    assert (checksum(db, union), checksum(db, munion)) == before
    # Messages sit beside their conversation, hot or archived, never split.
    assert (
        db.scalar("SELECT count(*) FROM messages_archive m JOIN conversations c ON c.id = m.conversation_id")
        == 0
    )
    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    assert (checksum(db, union), checksum(db, munion)) == before
    assert (
        db.scalar(
            "SELECT count(*) FROM conversations WHERE updated_at < :c AND deleted_at IS NULL", c=out["cutoff"]
        )
        == 0
    )
    lines = export.read_text().splitlines()
    exported = {json.loads(line)["conversation"]["id"] for line in lines}
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    assert {uuid.UUID(i) for i in exported} == moved
    # Each once: a batch killed before its COMMIT was cut off again by the rerun.
    assert len(lines) == len(exported)


@contextlib.contextmanager
def _commits_held(db, event: str = "INSERT ON conversations_archive"):
    """Batches wait at their COMMIT (archive batches after their export lines reached the
    file) until released: a deferred trigger (by default on conversations_archive) waits
    for an advisory lock the test holds. Yields a function that waits until a batch is held there and
    returns its server process id, and one that releases the lock."""
    db.execute(
        "CREATE FUNCTION held_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM set_config('lock_timeout', '0', true);"
        " PERFORM pg_advisory_xact_lock_shared(4343); RETURN NULL; END $$"
    )
    db.execute(
        f"CREATE CONSTRAINT TRIGGER held_at_commit AFTER {event}"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION held_at_commit()"
    )
    holder = db.engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(4343)"))

    def held(process) -> int:
        deadline = time.monotonic() + 60
        while True:
            pid = db.scalar(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 4343 AND NOT granted"
            )
            if pid is not None:
                return pid
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no batch reached its COMMIT"
            time.sleep(0.02)

    def release() -> None:
        holder.execute(text("SELECT pg_advisory_unlock(4343)"))

    try:
        yield held, release
    finally:
        holder.close()


def _stop_now(process, signum: int = signal.SIGTERM) -> None:
    """Ask twice, the second time once the first was handled: two signals pending at once
    count as one."""
    process.send_signal(signum)
    for line in process.stderr:
        if "again to stop now" in line:
            break
    else:
        raise AssertionError("the first signal was not acknowledged")
    process.send_signal(signum)


def _waiting_to_settle(db, process) -> None:
    """Wait until the run, stopped while its batch's COMMIT is held, waits to learn how
    that COMMIT ends: its read of the audit row ``FOR SHARE`` waits for the batch's
    transaction (for SETTLE_TIMEOUT at the most, after which it gives up and exits)."""
    deadline = time.monotonic() + 60
    while not db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE '%chatdb_runs%FOR SHARE%'"
    ):
        assert process.poll() is None, "the run did not wait to learn how its COMMIT ended"
        assert time.monotonic() < deadline, "the run never read its audit row"
        time.sleep(0.01)


def _no_longer_waiting(db, backend: int) -> None:
    """Wait until the batch's backend no longer waits at its COMMIT (it was cancelled)."""
    deadline = time.monotonic() + 60
    while db.scalar(
        "SELECT count(*) FROM pg_locks WHERE pid = :p AND locktype = 'advisory' AND NOT granted", p=backend
    ):
        assert time.monotonic() < deadline, "the COMMIT was not cancelled"
        time.sleep(0.01)


def _exported(path) -> list[uuid.UUID]:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return [uuid.UUID(json.loads(line)["conversation"]["id"]) for line in raw.decode().splitlines()]


_EARLIER = b'{"conversation": {"id": "00000000-0000-0000-0000-000000000000"}, "messages": []}\n'
_OTHER = _EARLIER.replace(b"00000000-0000", b"11111111-1111")


def test_an_export_file_that_cannot_grow_stops_the_run_in_one_line(migrated_db, tmp_path):
    """A full disk (here the file size limit, which fails a write the same way): the run
    stops with one line, the batch in flight rolls back, and the file holds exactly the
    conversations that were archived."""
    db = migrated_db
    populate(db)
    db.execute("DELETE FROM conversations_archive")
    export = tmp_path / "archive.jsonl"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatdb",
            "archive",
            "--older-than",
            "60d",
            "--batch-size",
            "5",
            "--export",
            str(export),
            "--database-url",
            db.cli_url,
        ],
        capture_output=True,
        text=True,
        # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)),
    )
    assert process.returncode == 1, process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot write --export {export}: File too large"], process.stderr
    assert "Traceback" not in process.stderr
    archived = ids(db, "SELECT id FROM conversations_archive")
    assert archived and sorted(_exported(export), key=str) == sorted(archived, key=str)
    run = db.scalar(
        "SELECT outcome || ' ' || (counts->>'export_bytes') FROM chatdb_runs ORDER BY id DESC LIMIT 1"
    )
    assert run == f"failed {export.stat().st_size}"


@pytest.mark.parametrize("replaced", [False, True], ids=["same file", "file replaced"])
def test_an_export_batch_that_never_committed_is_cut_off_by_the_next_run(
    cli, migrated_db, tmp_path, replaced
):
    """SIGKILL after a batch's lines reached the file and before its COMMIT took effect
    (the server ends the session, as a crash would): the next run cuts those lines off
    before appending, so a conversation the application wrote to in between is neither
    archived nor in the export. A different file put in its place is cut back never."""
    db = migrated_db
    populate(db)
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / "a.jsonl"
    export.write_bytes(_EARLIER)
    with _commits_held(db) as (held, release):
        process = _start(db, "archive", "--older-than", "60d", "--batch-size", "2", "--export", str(export))
        backend = held(process)
        in_file = _exported(export)[1:]
        assert len(in_file) == 2  # the first batch, fsynced before its COMMIT
        process.kill()
        process.wait()
        assert db.scalar("SELECT pg_terminate_backend(:p)", p=backend)
        release()
    deadline = time.monotonic() + 30
    while db.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = :p", p=backend):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert ids(db, "SELECT id FROM conversations_archive") == archived_earlier
    written_to = in_file[0]
    owner = db.scalar("SELECT user_id FROM conversations WHERE id = :i", i=written_to)
    with db.engine.connect() as connection:
        patterns.add_message(connection, written_to, owner, "user", "back again")
    if replaced:
        export.write_bytes(_OTHER * 4)

    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    kept = export.read_bytes().splitlines(keepends=True)[: 4 if replaced else 1]
    assert b"".join(kept) == (_OTHER * 4 if replaced else _EARLIER)
    exported = _exported(export)[len(kept) :]
    assert sorted(exported) == sorted(moved)  # each moved conversation once, nothing else
    assert out["exported"] == len(moved)
    assert written_to not in moved
    assert ids(db, "SELECT id FROM conversations WHERE id = :i", i=written_to) == {written_to}


@pytest.mark.parametrize("recorded", [0, 3_000_000_000], ids=["empty then", "past 2 GiB"])
def test_an_export_is_cut_back_only_to_a_length_that_describes_it(cli, migrated_db, tmp_path, recorded):
    """An unfinished earlier run recorded the file as empty (which identifies no file),
    or longer than it is now: the file's complete lines are all kept."""
    db = migrated_db
    populate(db)
    export = tmp_path / "a.jsonl"
    export.write_bytes(_OTHER * 3)
    db.execute(
        "INSERT INTO chatdb_runs (command, outcome, finished_at, counts)"
        " VALUES ('archive', 'interrupted', now(), jsonb_build_object("
        "  'export_path', CAST(:path AS text), 'export_bytes', CAST(:n AS bigint),"
        "  'export_tail', encode(sha256(''), 'hex')))",
        path=str(export.resolve()),
        n=recorded,
    )
    out = run_json(cli, db, "archive", "--older-than", "60d", "--export", str(export))
    assert export.read_bytes().startswith(_OTHER * 3)
    assert len(_exported(export)) == 3 + out["exported"]


def test_a_batch_that_fails_before_writing_its_lines_leaves_the_export_alone(migrated_db, tmp_path):
    """A batch whose audit update fails (here: its run was taken over, and the new run
    appended meanwhile) rolls back without touching the file: it wrote nothing to undo.
    After the first batch, the file gets another run's line, and a trigger makes the
    second batch's audit update find no row to renew, as a run marked by another does
    (its intent, in a transaction of its own, is recorded)."""
    db = migrated_db
    populate(db)
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / "a.jsonl"
    db.execute(
        """
        CREATE FUNCTION taken_over() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (OLD.counts->>'exported')::int > 0
               AND NEW.counts->>'exported' IS DISTINCT FROM OLD.counts->>'exported' THEN
                RETURN NULL;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER taken_over BEFORE UPDATE ON chatdb_runs FOR EACH ROW EXECUTE FUNCTION taken_over();
        """
    )

    def appended_meanwhile(done: lifecycle.Tally) -> None:
        with export.open("ab") as file:
            file.write(_OTHER)

    engine = engine_for(db)
    try:
        plan = lifecycle.plan_archive(engine, lifecycle.parse_duration("60d"))
        options = lifecycle.RunOptions(batch_size=2, jobs=1, progress=appended_meanwhile)
        with pytest.raises(StateError):
            lifecycle.archive(engine, plan, options, export)
    finally:
        engine.dispose()
    lines = export.read_bytes().splitlines(keepends=True)
    assert lines[-1] == _OTHER
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    assert len(moved) == 2  # the first batch
    assert sorted(_exported(export)[:-1]) == sorted(moved)


@pytest.mark.parametrize(
    "suffix, signum, code",
    [(".jsonl", signal.SIGTERM, 143), (".jsonl.gz", signal.SIGTERM, 143), (".jsonl", signal.SIGINT, 130)],
)
def test_an_export_batch_stopped_during_its_commit_keeps_its_lines_exactly_if_it_committed(
    migrated_db, tmp_path, suffix, signum, code
):
    """A second run, refused while an archive runs, leaves its export file as it is.
    A second SIGTERM while a batch's COMMIT is in flight stops the run, but the batch
    commits, and its lines stay in the export; a second Ctrl-C cancels the COMMIT, and
    its lines go. Either way the run waits to learn which, and leaves the file exact."""
    db = migrated_db
    populate(db)
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / f"a{suffix}"
    with _commits_held(db) as (held, release):
        process = _start(
            db, "archive", "--older-than", "60d", "--batch-size", "2", "--export", str(export), "--json"
        )
        batch = held(process)
        # Half a batch still being written, as far as anyone else can tell.
        with export.open("ab") as file:
            file.write(b'{"conversation": {"id": ')
        before = export.read_bytes()
        second = _start(db, "archive", "--older-than", "60d", "--export", str(export))
        assert second.wait(60) == 1
        assert "another archive or purge run is in progress" in second.stderr.read()
        assert export.read_bytes() == before
        export.write_bytes(before[: -len(b'{"conversation": {"id": ')])

        _stop_now(process, signum)  # during the COMMIT
        if signum == signal.SIGTERM:
            _waiting_to_settle(db, process)  # still waiting to learn how the COMMIT ended
        else:
            _no_longer_waiting(db, batch)  # Ctrl-C cancelled the COMMIT in the server
        release()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    assert len(moved) == (2 if signum == signal.SIGTERM else 0)
    assert sorted(_exported(export)) == sorted(moved)
    counts = db.scalar("SELECT counts FROM chatdb_runs ORDER BY id DESC LIMIT 1")
    assert counts["exported"] == len(moved) and counts["export_bytes"] == export.stat().st_size


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_current_batch(migrated_db, signum, code):
    db = migrated_db
    populate(db, conversations=2000)
    process = _start(db, "purge", "--older-than", "90d", "--batch-size", "1", "--json")
    _wait_for_batches(db, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    out = json.loads(stdout)
    assert out["outcome"] == "interrupted" and out["complete"] is False
    run = db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :i", i=out["run_id"])
    assert run == "interrupted"
    counted = db.scalar("SELECT counts FROM chatdb_runs WHERE id = :i", i=out["run_id"])
    assert counted["conversations"] == out["done"]["conversations"] > 0
    assert (
        out["remaining"]["conversations"]
        == db.scalar(
            "SELECT count(*) FROM conversations WHERE updated_at < :c OR deleted_at < :d",
            c=out["cutoff"],
            d=out["deleted_cutoff"],
        )
        > 0
    )


def test_a_second_signal_rolls_back_the_batch_in_flight_with_several_workers(migrated_db):
    """With two workers, the first batch waits at its COMMIT; a second SIGTERM cancels
    it, and it is not retried: it deletes nothing, and the audit row counts what did go."""
    db = migrated_db
    populate(db, conversations=2000)
    before = state(db)
    with _commits_held(db, "DELETE ON conversations") as (held, release):
        process = _start(db, "purge", "--older-than", "90d", "--jobs", "2", "--json")
        held(process)
        # Every batch of this phase deletes conversations and so waits: nothing moves.
        at_stop = state(db)
        _stop_now(process)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # a retried batch would wait here for the lock again
        release()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    after = state(db)
    assert after == at_stop, {table: len(at_stop[table] - after[table]) for table in after}
    run = db.scalar("SELECT counts FROM chatdb_runs ORDER BY id DESC LIMIT 1")
    assert run["complete"] is False
    assert run["conversations"] == len(before["conversations"] - after["conversations"])
    assert run["messages"] == len(before["messages"] - after["messages"])


def test_a_hard_stop_during_a_commit_that_never_ends_still_exits(migrated_db):
    """A second SIGTERM while the batch's COMMIT cannot finish: the run exits anyway,
    within seconds, leaves no statement behind in the server (the server drops a session
    whose client is gone: client_connection_check_interval), the run is marked
    interrupted, by itself or by the next run, and the next run finishes the job."""
    db = migrated_db
    populate(db)
    with _commits_held(db, "DELETE ON conversations") as (held, release):
        process = _start(db, "purge", "--older-than", "90d", "--jobs", "1")
        held(process)
        _stop_now(process)
        _, stderr = process.communicate(timeout=30)  # while the COMMIT still waits
        assert process.returncode == 143, stderr
        deadline = time.monotonic() + 60
        while db.scalar(_CHATDB_SESSIONS) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.scalar(_CHATDB_SESSIONS) == 0  # still before the lock is released
        release()
    again = _start(db, "purge", "--older-than", "90d", "--json")
    stdout, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr
    first = db.scalar("SELECT min(id) FROM chatdb_runs")
    assert db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :i", i=first) == "interrupted"
    assert json.loads(stdout)["took_over"] in ([], [first])
    assert db.scalar("SELECT count(*) FROM conversations WHERE updated_at < now() - interval '90 days'") == 0


_CHATDB_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND starts_with(application_name, 'chatdb')"
)


def test_max_runtime_stops_cleanly_and_says_what_is_left(cli, migrated_db):
    db = migrated_db
    populate(db, conversations=1500)
    # The first batches are held at their COMMIT past the deadline.
    with _commits_held(db, "DELETE ON conversations") as (_, release):
        timer = threading.Timer(1.5, release)
        timer.start()
        try:
            out = run_json(cli, db, "purge", "--older-than=90d", "--batch-size", "1", "--max-runtime", "1s")
        finally:
            timer.join()
    assert out["ok"] and out["complete"] is False and out["stopped_by"] == "max-runtime"
    left = db.scalar(
        "SELECT count(*) FROM conversations WHERE updated_at < :c OR deleted_at < :d",
        c=out["cutoff"],
        d=out["deleted_cutoff"],
    )
    assert out["remaining"]["conversations"] == left > 0
    again = run_json(cli, db, "purge", "--older-than", "90d")
    assert again["complete"] is True


# --- the audit trail ---------------------------------------------------------------------------------


def test_every_run_leaves_an_audit_row_that_status_shows(cli, migrated_db):
    db = migrated_db
    populate(db)
    out = run_json(cli, db, "purge", "--older-than", "90d", "--deleted-grace", "2w", "--batch-size", "50")
    row = (
        db.engine.connect()
        .execute(text("SELECT * FROM chatdb_runs WHERE id = :i"), {"i": out["run_id"]})
        .mappings()
        .one()
    )
    assert row["command"] == "purge" and row["outcome"] == "succeeded"
    assert row["arguments"] == {
        "older_than": "90d",
        "deleted_grace": "2w",
        "batch_size": 50,
        "jobs": 2,
        "max_runtime": None,
        "vacuum": False,
    }
    assert row["cutoff"].isoformat() == out["cutoff"]
    assert row["db_user"] == db.scalar("SELECT current_user")
    assert row["finished_at"] >= row["started_at"]
    assert row["counts"]["conversations"] == out["done"]["conversations"]
    assert row["client_pid"] == os.getpid()
    status = json.loads(cli("status", "--json", "--database-url", db.cli_url).stdout)
    assert status["runs"][0]["id"] == out["run_id"] and status["runs"][0]["outcome"] == "succeeded"
    human = cli("status", "--database-url", db.cli_url)
    assert "purge" in human.stdout and "succeeded" in human.stdout
    run_line = next(line for line in human.stdout.splitlines() if "succeeded" in line)
    done = out["done"]
    conversations = done["conversations"] + done["archive_conversations"]
    messages = done["messages"] + done["archive_messages"]
    assert [cell.strip() for cell in run_line.split("│")][-2:] == [f"{conversations:,}", f"{messages:,}"]


def test_a_failed_run_is_recorded_as_failed(cli, migrated_db, tmp_path):
    db = migrated_db
    populate(db)
    # A conversation id already in the archive: moving it there again fails, whole.
    dup = db.scalar(
        "SELECT id FROM conversations WHERE updated_at < now() - interval '100 days'"
        " AND deleted_at IS NULL LIMIT 1"
    )
    db.execute(
        "INSERT INTO conversations_archive SELECT c.*, now() FROM conversations c WHERE id = :i", i=dup
    )
    archived_earlier = ids(db, "SELECT id FROM conversations_archive")
    export = tmp_path / "a.jsonl"
    result = cli(
        "archive", "--older-than", "90d", "--export", str(export), "--json", "--database-url", db.cli_url
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
    assert db.scalar("SELECT outcome FROM chatdb_runs ORDER BY id DESC LIMIT 1") == "failed"
    assert "conversations_archive_pkey" in db.scalar("SELECT error FROM chatdb_runs ORDER BY id DESC LIMIT 1")
    status = json.loads(cli("status", "--json", "--database-url", db.cli_url).stdout)
    assert status["runs"][0]["outcome"] == "failed"
    assert "conversations_archive_pkey" in status["runs"][0]["error"]
    assert db.scalar("SELECT counts->'complete' FROM chatdb_runs ORDER BY id DESC LIMIT 1") is False
    assert db.scalar("SELECT count(*) FROM conversations WHERE id = :i", i=dup) == 1
    # The export holds the batches that committed before the failure, not the failed one.
    moved = ids(db, "SELECT id FROM conversations_archive") - archived_earlier
    assert sorted(_exported(export)) == sorted(moved)


def test_passwords_never_reach_the_audit_row(cli, migrated_db):
    engine = engine_for(migrated_db)
    try:
        plan = lifecycle.plan_purge(engine, lifecycle.parse_duration("90d"), lifecycle.parse_duration("30d"))
        result = lifecycle.purge(
            engine, plan, lifecycle.RunOptions(arguments={"source": "postgresql://ops:hunter2@db/chat"})
        )
    finally:
        engine.dispose()
    stored = migrated_db.scalar("SELECT arguments::text FROM chatdb_runs WHERE id = :i", i=result.run_id)
    assert "hunter2" not in stored and "***" in stored


def test_on_a_terminal_the_plan_is_shown_and_confirmed(migrated_db):
    from test_cli import run_on_terminal

    db = migrated_db
    populate(db)
    before = state(db)
    # The data stays an hour clear of the cutoffs, so the plan's counts are these.
    going = predicted_purge(
        db,
        db.scalar("SELECT now() - interval '90 days'"),
        db.scalar("SELECT now() - interval '30 days'"),
    )
    args = ["purge", "--older-than", "90d", "--database-url", db.cli_url]
    declined, screen, asked = run_on_terminal(args, "n")
    assert asked and declined == 1, screen
    plan = screen[: screen.index("[y/N]")]
    assert "Cutoff (database clock): idle since before" in plan
    for table in ("conversations", "messages", "messages_archive"):
        assert f"{len(going[table]):,}" in plan, (table, plan)
    assert state(db) == before
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 0

    accepted, screen, asked = run_on_terminal(args, "y")
    assert asked and accepted == 0, screen
    assert "Run 1: purge" in screen
    for table, rows in state(db).items():
        assert rows == before[table] - going[table]


def test_counts_are_exact_without_table_statistics(cli, migrated_db):
    """With track_counts off, the messages of purged conversations are deleted and
    counted explicitly instead of through the cascade's statistics."""
    db = migrated_db
    populate(db)
    gone = predicted_purge(
        db, db.scalar("SELECT now() - interval '90 days'"), db.scalar("SELECT now() - interval '30 days'")
    )
    url = db.cli_url + "&options=-c%20track_counts%3Doff"
    result = cli("purge", "--older-than", "90d", "--json", "--database-url", url)
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)["done"]
    assert done == {
        "conversations": len(gone["conversations"]),
        "messages": len(gone["messages"]),
        "archive_conversations": len(gone["conversations_archive"]),
        "archive_messages": len(gone["messages_archive"]),
    }


def test_a_second_run_is_refused_naming_the_running_one(cli, migrated_db):
    """The refusal names the run that holds the guard: command, id, start, user, host
    and pid, as its audit row says."""
    db = migrated_db
    db.execute(
        "INSERT INTO chatdb_runs (command, client_host, client_pid, started_at, heartbeat_at)"
        " VALUES ('archive', 'ops-host-7', 4321, '2026-11-30 12:05:06+00', now())"
    )
    run_id = db.scalar("SELECT id FROM chatdb_runs")
    engine = engine_for(db)
    guard = lifecycle.Guard(engine)
    try:
        assert guard.try_lock()  # held as the running archive holds it
        result = cli("purge", "--older-than", "90d", "--json", "--database-url", db.cli_url)
    finally:
        guard.release()
        engine.dispose()
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    user = db.scalar("SELECT current_user")
    assert f"archive run {run_id}, started 2026-11-30 " in error, error
    assert f" by {user} on ops-host-7 (pid 4321), last heartbeat " in error, error
