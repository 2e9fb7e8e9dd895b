"""The database itself enforces the head schema's rules, whoever writes to it.

Every refusal names the constraint that fires (``diag.constraint_name``), so a test
fails if a rule disappears or a different rule happens to catch the row.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

ALICE, BOB, CAROL = "alice", "bob", "carol"
ALICE_CHAT = "00000000-0000-4000-8000-00000000a001"
ALICE_OTHER_CHAT = "00000000-0000-4000-8000-00000000a002"
BOB_CHAT = "00000000-0000-4000-8000-00000000b001"
ALICE_ARCHIVED = "00000000-0000-4000-8000-0000000aa001"
BOB_ARCHIVED = "00000000-0000-4000-8000-0000000bb001"
MISSING = "00000000-0000-4000-8000-0000000000ff"

ARCHIVE_TABLES = {"messages": "conversations", "messages_archive": "conversations_archive"}


@pytest.fixture
def db(migrated_db):
    """Alice (two chats, one archived chat), Bob (one chat, one archived chat), Carol
    (nothing)."""
    with migrated_db.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO users (id) VALUES (:a), (:b), (:c)"), {"a": ALICE, "b": BOB, "c": CAROL}
        )
        connection.execute(
            text("INSERT INTO conversations (id, user_id) VALUES (:ac, :a), (:ao, :a), (:bc, :b)"),
            {"a": ALICE, "b": BOB, "ac": ALICE_CHAT, "ao": ALICE_OTHER_CHAT, "bc": BOB_CHAT},
        )
        connection.execute(
            text("INSERT INTO conversations_archive (id, user_id) VALUES (:aa, :a), (:ba, :b)"),
            {"a": ALICE, "b": BOB, "aa": ALICE_ARCHIVED, "ba": BOB_ARCHIVED},
        )
    return migrated_db


def refused(db, sql: str, **params) -> str:
    """Run ``sql`` in its own transaction; it must raise an integrity error. Returns the
    name of the constraint that refused it."""
    with pytest.raises(IntegrityError) as raised, db.engine.begin() as connection:
        connection.execute(text(sql), params)
    name = raised.value.orig.diag.constraint_name
    assert name, f"an integrity error without a constraint name: {raised.value.orig}"
    return name


def add_message(
    db,
    content: str = "hi",
    role: str = "user",
    conversation: str = ALICE_CHAT,
    user: str = ALICE,
    table: str = "messages",
) -> str:
    with db.engine.begin() as connection:
        return str(
            connection.execute(
                text(
                    f"INSERT INTO {table} (conversation_id, user_id, role, content)"
                    " VALUES (:c, :u, :r, :t) RETURNING id"
                ),
                {"c": conversation, "u": user, "r": role, "t": content},
            ).scalar_one()
        )


def message_sql(table: str = "messages") -> str:
    return f"INSERT INTO {table} (conversation_id, user_id, role, content) VALUES (:c, :u, :r, :t)"


def ids(db, table: str) -> set[str]:
    with db.engine.connect() as connection:
        return {str(row[0]) for row in connection.execute(text(f"SELECT id FROM {table}"))}


HOT = {"table": "messages", "conversation": ALICE_CHAT}
COLD = {"table": "messages_archive", "conversation": ALICE_ARCHIVED}
LENGTH_CHECK = {
    "messages": "chk_user_message_length",
    "messages_archive": "chk_messages_archive_user_message_length",
}
ROLE_CHECK = {"messages": "chk_message_role", "messages_archive": "chk_messages_archive_role"}
STATUS_CHECK = {
    "conversations": "chk_conversation_status",
    "conversations_archive": "chk_conversations_archive_status",
}
OWNER_FK = {
    "messages": "fk_messages_conversation_owner",
    "messages_archive": "fk_messages_archive_conversation_owner",
}
both_message_tables = pytest.mark.parametrize("where", [HOT, COLD], ids=["messages", "messages_archive"])
both_conversation_tables = pytest.mark.parametrize("table", ["conversations", "conversations_archive"])


# 1. User messages: at most 1000 characters (not bytes); other roles may be longer.


@both_message_tables
@pytest.mark.parametrize(
    "content",
    ["x" * 1000, "é" * 1000, "🙂" * 1000, "字" * 999 + "x"],
    ids=["ascii", "2-byte", "4-byte-emoji", "3-byte"],
)
def test_a_user_message_of_exactly_1000_characters_is_accepted(db, where, content):
    assert len(content.encode()) >= 1000  # the multi-byte ones are well over 1000 bytes
    message = add_message(db, content, conversation=where["conversation"], table=where["table"])
    stored = db.scalar(f"SELECT content FROM {where['table']} WHERE id = :id", id=message)
    assert stored == content
    assert db.scalar(f"SELECT char_length(content) FROM {where['table']} WHERE id = :id", id=message) == 1000


@both_message_tables
@pytest.mark.parametrize("content", ["x" * 1001, "é" * 1001, "🙂" * 1001, "x" * 5000])
def test_a_user_message_over_1000_characters_is_refused(db, where, content):
    table = where["table"]
    name = refused(db, message_sql(table), c=where["conversation"], u=ALICE, r="user", t=content)
    assert name == LENGTH_CHECK[table]
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0


@both_message_tables
@pytest.mark.parametrize("role", ["assistant", "system"])
@pytest.mark.parametrize("size", [1001, 5000, 100_000])
def test_assistant_and_system_messages_may_be_longer(db, where, role, size):
    message = add_message(db, "y" * size, role=role, conversation=where["conversation"], table=where["table"])
    assert db.scalar(f"SELECT char_length(content) FROM {where['table']} WHERE id = :id", id=message) == size


@both_message_tables
def test_an_update_cannot_grow_a_user_message_past_1000_characters(db, where):
    table = where["table"]
    short = add_message(db, "x" * 1000, conversation=where["conversation"], table=table)
    update = f"UPDATE {table} SET content = content || 'x' WHERE id = :id"
    assert refused(db, update, id=short) == LENGTH_CHECK[table]
    # Nor can a long assistant message be relabelled as the user's.
    long = add_message(db, "y" * 5000, role="assistant", conversation=where["conversation"], table=table)
    assert refused(db, f"UPDATE {table} SET role = 'user' WHERE id = :id", id=long) == LENGTH_CHECK[table]
    assert db.scalar(f"SELECT char_length(content) FROM {table} WHERE id = :id", id=short) == 1000
    assert db.scalar(f"SELECT role FROM {table} WHERE id = :id", id=long) == "assistant"


# 2. Roles.


@both_message_tables
@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_known_roles_are_accepted(db, where, role):
    message = add_message(db, role=role, conversation=where["conversation"], table=where["table"])
    assert db.scalar(f"SELECT role FROM {where['table']} WHERE id = :id", id=message) == role


@both_message_tables
@pytest.mark.parametrize("role", ["tool", "User", "ASSISTANT", "function", "", " user", "user "])
def test_unknown_roles_are_refused(db, where, role):
    table = where["table"]
    assert (
        refused(db, message_sql(table), c=where["conversation"], u=ALICE, r=role, t="hi") == ROLE_CHECK[table]
    )
    # An existing message cannot be changed to an unknown role either.
    message = add_message(db, role="assistant", conversation=where["conversation"], table=table)
    assert (
        refused(db, f"UPDATE {table} SET role = :r WHERE id = :id", r=role, id=message) == ROLE_CHECK[table]
    )


# 3. Conversation statuses and defaults.


@both_conversation_tables
@pytest.mark.parametrize("status", ["active", "archived"])
def test_known_statuses_are_accepted(db, table, status):
    with db.engine.begin() as connection:
        new = connection.execute(
            text(f"INSERT INTO {table} (user_id, status) VALUES (:u, :s) RETURNING id"),
            {"u": CAROL, "s": status},
        ).scalar_one()
    assert db.scalar(f"SELECT status FROM {table} WHERE id = :id", id=new) == status


@both_conversation_tables
@pytest.mark.parametrize("status", ["deleted", "Active", "ARCHIVED", "", "active "])
def test_unknown_statuses_are_refused(db, table, status):
    insert = f"INSERT INTO {table} (user_id, status) VALUES (:u, :s)"
    assert refused(db, insert, u=CAROL, s=status) == STATUS_CHECK[table]
    existing = ALICE_CHAT if table == "conversations" else ALICE_ARCHIVED
    update = f"UPDATE {table} SET status = :s WHERE id = :id"
    assert refused(db, update, s=status, id=existing) == STATUS_CHECK[table]
    assert db.scalar(f"SELECT status FROM {table} WHERE id = :id", id=existing) == "active"


@both_conversation_tables
def test_conversation_defaults(db, table):
    """status 'active', a random uuid id, created_at and updated_at = now() (the
    transaction's start, so no clock is compared)."""
    with db.engine.begin() as connection:
        rows = connection.execute(
            text(
                f"INSERT INTO {table} (user_id) VALUES (:u), (:u)"
                " RETURNING id, status, created_at, updated_at, pg_typeof(id)::text AS id_type,"
                " created_at = now() AS created_now, updated_at = now() AS updated_now"
            ),
            {"u": CAROL},
        ).all()
    for row in rows:
        assert row.status == "active"
        assert row.id_type == "uuid"
        assert isinstance(row.id, uuid.UUID)
        assert row.id.version == 4  # gen_random_uuid()
        assert row.created_now is True
        assert row.updated_now is True
        assert row.created_at.tzinfo is not None
        assert row.updated_at.tzinfo is not None
    assert rows[0].id != rows[1].id


@pytest.mark.parametrize("table", ["messages", "messages_archive"])
def test_message_id_and_created_at_defaults(db, table):
    conversation = ALICE_CHAT if table == "messages" else ALICE_ARCHIVED
    with db.engine.begin() as connection:
        rows = connection.execute(
            text(
                f"INSERT INTO {table} (conversation_id, user_id, role, content)"
                " VALUES (:c, :u, 'user', 'a'), (:c, :u, 'assistant', 'b')"
                " RETURNING id, created_at, created_at = now() AS created_now"
            ),
            {"c": conversation, "u": ALICE},
        ).all()
    assert all(isinstance(row.id, uuid.UUID) and row.id.version == 4 for row in rows)
    assert rows[0].id != rows[1].id
    assert all(row.created_now is True and row.created_at.tzinfo is not None for row in rows)


def test_every_timestamp_column_is_timestamptz_and_now_by_default(db):
    with db.engine.connect() as connection:
        columns = {
            (row.table_name, row.column_name): (row.data_type, row.column_default)
            for row in connection.execute(
                text(
                    "SELECT table_name, column_name, data_type, column_default"
                    " FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = ANY(:tables)"
                    " AND data_type LIKE 'timestamp%'"
                ),
                {"tables": ["conversations", "messages", "conversations_archive", "messages_archive"]},
            )
        }
    defaulted = {
        ("conversations", "created_at"),
        ("conversations", "updated_at"),
        ("messages", "created_at"),
        ("conversations_archive", "created_at"),
        ("conversations_archive", "updated_at"),
        ("conversations_archive", "archived_at"),
        ("messages_archive", "created_at"),
        ("messages_archive", "archived_at"),
    }
    soft_delete = {
        (table, "deleted_at")
        for table in ("conversations", "messages", "conversations_archive", "messages_archive")
    }
    assert set(columns) == defaulted | soft_delete
    for key, (data_type, default) in columns.items():
        assert data_type == "timestamp with time zone", key
        assert default == ("now()" if key in defaulted else None), key


# 4. A message's user is its conversation's owner.


@both_message_tables
def test_a_message_of_another_user_in_alices_conversation_is_refused(db, where):
    table = where["table"]
    sql = message_sql(table)
    for other in (BOB, CAROL):  # Bob has conversations of his own, Carol has none
        assert refused(db, sql, c=where["conversation"], u=other, r="user", t="hi") == OWNER_FK[table]
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0
    add_message(db, conversation=where["conversation"], table=table)  # the owner may
    assert db.scalar(f"SELECT count(*) FROM {table}") == 1


@both_message_tables
def test_a_message_cannot_be_moved_to_another_user(db, where):
    table = where["table"]
    message = add_message(db, conversation=where["conversation"], table=table)
    assert (
        refused(db, f"UPDATE {table} SET user_id = :u WHERE id = :id", u=BOB, id=message) == OWNER_FK[table]
    )
    # Nor into someone else's conversation.
    bobs = BOB_CHAT if table == "messages" else BOB_ARCHIVED
    assert (
        refused(db, f"UPDATE {table} SET conversation_id = :c WHERE id = :id", c=bobs, id=message)
        == (OWNER_FK[table])
    )


@pytest.mark.parametrize(
    "table, conversation", [("conversations", ALICE_CHAT), ("conversations_archive", ALICE_ARCHIVED)]
)
def test_a_conversation_with_messages_cannot_change_owner(db, table, conversation):
    message_table = "messages" if table == "conversations" else "messages_archive"
    add_message(db, conversation=conversation, table=message_table)
    update = f"UPDATE {table} SET user_id = :u WHERE id = :id"
    assert refused(db, update, u=BOB, id=conversation) == OWNER_FK[message_table]
    assert db.scalar(f"SELECT user_id FROM {table} WHERE id = :id", id=conversation) == ALICE


# 5. Rows need their parents.


@pytest.mark.parametrize(
    "table, constraint",
    [
        ("conversations", "conversations_user_id_fkey"),
        ("conversations_archive", "conversations_archive_user_id_fkey"),
    ],
)
def test_a_conversation_needs_an_existing_user(db, table, constraint):
    assert refused(db, f"INSERT INTO {table} (user_id) VALUES ('nobody')") == constraint
    assert refused(db, f"UPDATE {table} SET user_id = 'nobody' WHERE user_id = :u", u=BOB) == constraint


@both_message_tables
def test_a_message_needs_an_existing_conversation(db, where):
    table = where["table"]
    assert refused(db, message_sql(table), c=MISSING, u=ALICE, r="user", t="hi") == OWNER_FK[table]


def test_a_message_needs_an_existing_user(db):
    # Both the plain foreign key to users and the owner key refuse it; either may report.
    name = refused(db, message_sql(), c=ALICE_CHAT, u="nobody", r="user", t="hi")
    assert name in {"messages_user_id_fkey", "fk_messages_conversation_owner"}
    name = refused(db, message_sql("messages_archive"), c=ALICE_ARCHIVED, u="nobody", r="user", t="hi")
    assert name == "fk_messages_archive_conversation_owner"


def test_a_user_with_conversations_is_not_renamed_from_under_them(db):
    # No ON UPDATE CASCADE: the keys refuse a change of users.id that would orphan rows.
    name = refused(db, "UPDATE users SET id = 'alice2' WHERE id = :u", u=ALICE)
    assert name in {"conversations_user_id_fkey", "conversations_archive_user_id_fkey"}


# 6. Cascades.


def populate(db) -> dict[str, dict[str, set[str]]]:
    """Messages in every conversation; returns each user's rows by table."""
    rows: dict[str, dict[str, set[str]]] = {
        user: {t: set() for t in ("conversations", "messages", "conversations_archive", "messages_archive")}
        for user in (ALICE, BOB)
    }
    rows[ALICE]["conversations"] = {ALICE_CHAT, ALICE_OTHER_CHAT}
    rows[BOB]["conversations"] = {BOB_CHAT}
    rows[ALICE]["conversations_archive"] = {ALICE_ARCHIVED}
    rows[BOB]["conversations_archive"] = {BOB_ARCHIVED}
    for user, conversation, table in (
        (ALICE, ALICE_CHAT, "messages"),
        (ALICE, ALICE_OTHER_CHAT, "messages"),
        (BOB, BOB_CHAT, "messages"),
        (ALICE, ALICE_ARCHIVED, "messages_archive"),
        (BOB, BOB_ARCHIVED, "messages_archive"),
    ):
        for role in ("user", "assistant", "system"):
            rows[user][table].add(
                add_message(db, role=role, conversation=conversation, user=user, table=table)
            )
    return rows


def test_deleting_a_conversation_deletes_its_messages_and_only_those(db):
    rows = populate(db)
    with db.engine.connect() as connection:
        doomed = {
            str(r[0])
            for r in connection.execute(
                text("SELECT id FROM messages WHERE conversation_id = :c"), {"c": ALICE_CHAT}
            )
        }
    assert len(doomed) == 3
    db.execute("DELETE FROM conversations WHERE id = :c", c=ALICE_CHAT)
    assert ids(db, "messages") == (rows[ALICE]["messages"] | rows[BOB]["messages"]) - doomed
    assert ids(db, "conversations") == {ALICE_OTHER_CHAT, BOB_CHAT}
    assert ids(db, "messages_archive") == rows[ALICE]["messages_archive"] | rows[BOB]["messages_archive"]
    assert ids(db, "conversations_archive") == {ALICE_ARCHIVED, BOB_ARCHIVED}
    assert ids(db, "users") == {ALICE, BOB, CAROL}


@pytest.mark.parametrize("deleted, kept", [(ALICE, BOB), (BOB, ALICE)])
def test_deleting_a_user_deletes_all_their_rows_archive_included_and_nothing_else(db, deleted, kept):
    rows = populate(db)
    db.execute("DELETE FROM users WHERE id = :u", u=deleted)
    for table in ("conversations", "messages", "conversations_archive", "messages_archive"):
        assert ids(db, table) == rows[kept][table], table
    assert ids(db, "users") == {kept, CAROL}


def test_deleting_an_archived_conversation_deletes_its_archived_messages_only(db):
    rows = populate(db)
    db.execute("DELETE FROM conversations_archive WHERE id = :c", c=ALICE_ARCHIVED)
    assert ids(db, "messages_archive") == rows[BOB]["messages_archive"]
    assert ids(db, "conversations_archive") == {BOB_ARCHIVED}
    assert ids(db, "messages") == rows[ALICE]["messages"] | rows[BOB]["messages"]
    assert ids(db, "conversations") == {ALICE_CHAT, ALICE_OTHER_CHAT, BOB_CHAT}


# 7. The archive tables.


def test_an_archived_message_cannot_reference_a_hot_conversation(db):
    name = refused(db, message_sql("messages_archive"), c=ALICE_CHAT, u=ALICE, r="user", t="hi")
    assert name == "fk_messages_archive_conversation_owner"
    # Nor a hot message an archived conversation.
    name = refused(db, message_sql("messages"), c=ALICE_ARCHIVED, u=ALICE, r="user", t="hi")
    assert name == "fk_messages_conversation_owner"


def test_the_archive_is_independent_of_the_hot_conversation_it_came_from(db):
    """``archive`` copies a conversation under the same id, then deletes the hot row: the
    archived messages hang off the archived copy, so deleting the hot one leaves them."""
    db.execute("INSERT INTO conversations_archive (id, user_id) VALUES (:c, :u)", c=ALICE_CHAT, u=ALICE)
    hot = add_message(db, conversation=ALICE_CHAT)
    cold = add_message(db, conversation=ALICE_CHAT, table="messages_archive")
    db.execute("DELETE FROM conversations WHERE id = :c", c=ALICE_CHAT)
    assert hot not in ids(db, "messages")
    assert ids(db, "messages_archive") == {cold}
    assert ALICE_CHAT in ids(db, "conversations_archive")


ARCHIVE_INSERTS = {
    "conversations_archive": "INSERT INTO conversations_archive (user_id{extra}) VALUES (:u{value})",
    "messages_archive": "INSERT INTO messages_archive (conversation_id, user_id, role, content{extra})"
    " VALUES (:c, :u, 'user', 'hi'{value})",
}


@pytest.mark.parametrize("table", ["conversations_archive", "messages_archive"])
def test_archived_at_defaults_to_now(db, table):
    params = {"u": ALICE, "c": ALICE_ARCHIVED, "t": "2020-01-01T00:00:00Z"}
    with db.engine.begin() as connection:
        row = connection.execute(
            text(
                ARCHIVE_INSERTS[table].format(extra="", value="")
                + " RETURNING archived_at, archived_at = now() AS archived_now,"
                " archived_at = created_at AS same_as_created"
            ),
            params,
        ).one()
    assert row.archived_now is True
    assert row.same_as_created is True
    assert row.archived_at.tzinfo is not None
    # An explicit archived_at is kept: it is a default, not a trigger.
    db.execute(ARCHIVE_INSERTS[table].format(extra=", archived_at", value=", :t"), **params)
    assert db.scalar(f"SELECT count(*) FROM {table} WHERE archived_at = :t", t=params["t"]) == 1


def test_archived_at_is_required(db):
    with pytest.raises(IntegrityError) as raised, db.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO conversations_archive (user_id, archived_at) VALUES (:u, NULL)"), {"u": ALICE}
        )
    assert isinstance(raised.value.orig, psycopg.errors.NotNullViolation)
    assert raised.value.orig.diag.column_name == "archived_at"


# 8. chatdb_runs.


def start_run(db, command: str = "archive", outcome: str | None = None) -> int:
    columns, values = ("command", ":cmd") if outcome is None else ("command, outcome", ":cmd, :o")
    with db.engine.begin() as connection:
        return connection.execute(
            text(f"INSERT INTO chatdb_runs ({columns}) VALUES ({values}) RETURNING id"),
            {"cmd": command, "o": outcome},
        ).scalar_one()


@pytest.mark.parametrize("outcome", ["running", "succeeded", "failed", "interrupted"])
def test_known_outcomes_are_accepted(db, outcome):
    run = start_run(db, outcome=outcome)
    assert db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :id", id=run) == outcome


@pytest.mark.parametrize("outcome", ["done", "Running", "SUCCEEDED", "cancelled", "", "paused"])
def test_unknown_outcomes_are_refused(db, outcome):
    sql = "INSERT INTO chatdb_runs (command, outcome) VALUES ('purge', :o)"
    assert refused(db, sql, o=outcome) == "chk_chatdb_runs_outcome"
    run = start_run(db, outcome="failed")
    update = "UPDATE chatdb_runs SET outcome = :o WHERE id = :id"
    assert refused(db, update, o=outcome, id=run) == "chk_chatdb_runs_outcome"


def test_outcome_defaults_to_running(db):
    run = start_run(db)
    assert db.scalar("SELECT outcome FROM chatdb_runs WHERE id = :id", id=run) == "running"


def test_at_most_one_run_is_running(db):
    first = start_run(db, "archive")
    for command in ("archive", "purge"):
        sql = "INSERT INTO chatdb_runs (command) VALUES (:cmd)"
        assert refused(db, sql, cmd=command) == "uq_chatdb_runs_one_running"
    # Any number of finished runs beside it.
    for outcome in ("succeeded", "failed", "interrupted") * 3:
        start_run(db, "purge", outcome)
    # A finished run cannot be put back to running while another runs...
    finished = db.scalar("SELECT min(id) FROM chatdb_runs WHERE outcome = 'failed'")
    update = "UPDATE chatdb_runs SET outcome = 'running' WHERE id = :id"
    assert refused(db, update, id=finished) == "uq_chatdb_runs_one_running"
    assert db.scalar("SELECT count(*) FROM chatdb_runs WHERE outcome = 'running'") == 1
    assert db.scalar("SELECT count(*) FROM chatdb_runs") == 10
    # ...but once the running one has finished, the next may start.
    db.execute("UPDATE chatdb_runs SET outcome = 'interrupted' WHERE id = :id", id=first)
    second = start_run(db, "purge")
    assert db.scalar("SELECT id FROM chatdb_runs WHERE outcome = 'running'") == second


def test_an_uncommitted_running_run_already_blocks_another(db):
    """The guard holds across concurrent transactions: a second starter waits on the
    first (here: gives up at its lock timeout) instead of slipping in beside it."""
    with db.engine.connect() as first, db.engine.connect() as second:
        first.execute(text("INSERT INTO chatdb_runs (command) VALUES ('archive')"))  # not committed
        second.execute(text("SET lock_timeout = '200ms'"))
        with pytest.raises(DBAPIError) as raised:
            second.execute(text("INSERT INTO chatdb_runs (command) VALUES ('purge')"))
        assert isinstance(raised.value.orig, psycopg.errors.LockNotAvailable)
        second.rollback()
        first.commit()
        with pytest.raises(IntegrityError) as raised:
            second.execute(text("INSERT INTO chatdb_runs (command) VALUES ('purge')"))
        assert raised.value.orig.diag.constraint_name == "uq_chatdb_runs_one_running"
        second.rollback()
    assert db.scalar("SELECT string_agg(command, ',') FROM chatdb_runs") == "archive"


def test_run_id_is_generated_always(db):
    first, second = start_run(db, outcome="succeeded"), start_run(db, outcome="failed")
    assert second > first
    assert (
        db.scalar(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'chatdb_runs'::regclass AND attname = 'id'"
        )
        == "a"
    )
    with pytest.raises(DBAPIError) as raised, db.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO chatdb_runs (id, command, outcome) VALUES (999, 'purge', 'failed')")
        )
    assert isinstance(raised.value.orig, psycopg.errors.GeneratedAlways)
    assert raised.value.orig.sqlstate == "428C9"
    with pytest.raises(DBAPIError) as raised, db.engine.begin() as connection:
        connection.execute(text("UPDATE chatdb_runs SET id = 999 WHERE id = :id"), {"id": first})
    assert isinstance(raised.value.orig, psycopg.errors.GeneratedAlways)
    assert ids(db, "chatdb_runs") == {str(first), str(second)}


def test_run_db_user_defaults_to_current_user(db):
    with db.engine.begin() as connection:
        row = connection.execute(
            text("INSERT INTO chatdb_runs (command) VALUES ('purge') RETURNING db_user, current_user AS me")
        ).one()
    assert row.db_user == row.me


def test_run_db_user_follows_the_role_that_inserts(db):
    """Not a constant that happens to equal the test's role: another role gets its own
    name. The role exists only inside a transaction that is rolled back."""
    if not db.scalar("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("the test server's role cannot create roles")
    role = f"chatdb_test_writer_{uuid.uuid4().hex[:12]}"
    with db.engine.connect() as connection:
        try:
            connection.execute(text(f'CREATE ROLE "{role}"'))
            connection.execute(text(f'GRANT INSERT, SELECT ON chatdb_runs TO "{role}"'))
            connection.execute(text(f'SET LOCAL ROLE "{role}"'))
            db_user = connection.execute(
                text("INSERT INTO chatdb_runs (command) VALUES ('purge') RETURNING db_user")
            ).scalar_one()
        finally:
            connection.rollback()
    assert db_user == role
    assert db.scalar("SELECT count(*) FROM pg_roles WHERE rolname = :r", r=role) == 0
