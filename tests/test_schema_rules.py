"""What the database itself enforces at head, whoever writes to it."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

ALICE, BOB = "alice", "bob"
C1 = "00000000-0000-4000-8000-00000000000a"  # Alice's
C2 = "00000000-0000-4000-8000-00000000000b"  # Bob's
A1 = "00000000-0000-4000-8000-0000000000a1"  # Alice's archived conversation


@pytest.fixture
def db(migrated_db):
    migrated_db.execute(
        f"INSERT INTO users (id) VALUES ('{ALICE}'), ('{BOB}');"
        f" INSERT INTO conversations (id, user_id) VALUES ('{C1}', '{ALICE}'), ('{C2}', '{BOB}');"
        f" INSERT INTO conversations_archive (id, user_id) VALUES ('{A1}', '{ALICE}')"
    )
    return migrated_db


def violated(db, sql: str, **params) -> str:
    """The name of the constraint that refuses ``sql``."""
    with pytest.raises(IntegrityError) as raised, db.engine.begin() as connection:
        connection.execute(text(sql), params)
    return raised.value.orig.diag.constraint_name


def insert_message(db, content: str, role: str = "user", conversation: str = C1, user: str = ALICE):
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content) VALUES (:c, :u, :r, :t)",
        c=conversation,
        u=user,
        r=role,
        t=content,
    )


@pytest.mark.parametrize("content", ["x" * 1000, "é" * 1000, "🙂" * 1000])
def test_user_messages_up_to_1000_characters_are_accepted(db, content):
    insert_message(db, content)
    assert db.scalar("SELECT char_length(content) FROM messages") == 1000


@pytest.mark.parametrize("content", ["x" * 1001, "é" * 1001])
def test_user_messages_over_1000_characters_are_refused(db, content):
    sql = "INSERT INTO messages (conversation_id, user_id, role, content) VALUES (:c, :u, 'user', :t)"
    assert violated(db, sql, c=C1, u=ALICE, t=content) == "chk_user_message_length"


@pytest.mark.parametrize("role", ["assistant", "system"])
def test_assistant_and_system_messages_may_be_longer(db, role):
    insert_message(db, "y" * 5000, role=role)


@pytest.mark.parametrize("role", ["tool", "User", ""])
def test_unknown_roles_are_refused(db, role):
    sql = "INSERT INTO messages (conversation_id, user_id, role, content) VALUES (:c, :u, :r, 'hi')"
    assert violated(db, sql, c=C1, u=ALICE, r=role) == "chk_message_role"


def test_statuses_and_defaults(db):
    assert violated(db, f"UPDATE conversations SET status = 'deleted' WHERE id = '{C1}'") == (
        "chk_conversation_status"
    )
    db.execute(f"UPDATE conversations SET status = 'archived' WHERE id = '{C1}'")
    with db.engine.begin() as connection:
        row = connection.execute(
            text(
                "INSERT INTO conversations (user_id) VALUES (:u)"
                " RETURNING id, status, created_at = now() AND updated_at = now()"
            ),
            {"u": ALICE},
        ).one()
    assert row.status == "active"
    assert row.id is not None
    assert row[2] is True


def test_a_message_must_belong_to_its_conversation_owner(db):
    sql = "INSERT INTO messages (conversation_id, user_id, role, content) VALUES (:c, :u, 'user', 'hi')"
    assert violated(db, sql, c=C1, u=BOB) == "fk_messages_conversation_owner"
    # Nor can a conversation change hands under its messages.
    insert_message(db, "mine")
    assert violated(db, f"UPDATE conversations SET user_id = '{BOB}' WHERE id = '{C1}'") == (
        "fk_messages_conversation_owner"
    )


def test_archived_messages_must_belong_to_their_archived_conversation_owner(db):
    sql = (
        "INSERT INTO messages_archive (conversation_id, user_id, role, content) VALUES (:c, :u, 'user', 'hi')"
    )
    assert violated(db, sql, c=A1, u=BOB) == "fk_messages_archive_conversation_owner"
    # An archived message cannot point at a hot conversation.
    assert violated(db, sql, c=C1, u=ALICE) == "fk_messages_archive_conversation_owner"
    db.execute(sql, c=A1, u=ALICE)
    assert db.scalar("SELECT archived_at > now() - interval '1 minute' FROM messages_archive") is True


@pytest.mark.parametrize(
    "sql, constraint",
    [
        (
            "INSERT INTO messages_archive (conversation_id, user_id, role, content)"
            f" VALUES ('{A1}', '{ALICE}', 'robot', 'hi')",
            "chk_messages_archive_role",
        ),
        (
            "INSERT INTO messages_archive (conversation_id, user_id, role, content)"
            f" VALUES ('{A1}', '{ALICE}', 'user', repeat('z', 1001))",
            "chk_messages_archive_user_message_length",
        ),
        (
            f"UPDATE conversations_archive SET status = 'gone' WHERE id = '{A1}'",
            "chk_conversations_archive_status",
        ),
    ],
)
def test_archive_tables_keep_the_same_checks(db, sql, constraint):
    assert violated(db, sql) == constraint


def test_rows_need_their_parents(db):
    assert (
        violated(db, "INSERT INTO conversations (user_id) VALUES ('nobody')") == "conversations_user_id_fkey"
    )
    sql = (
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        f" VALUES ('00000000-0000-4000-8000-0000000000ff', '{ALICE}', 'user', 'hi')"
    )
    assert violated(db, sql) == "fk_messages_conversation_owner"


def counts(db) -> dict[str, int]:
    return {
        table: db.scalar(f"SELECT count(*) FROM {table}")
        for table in ("users", "conversations", "messages", "conversations_archive", "messages_archive")
    }


def test_deleting_a_conversation_deletes_only_its_messages(db):
    insert_message(db, "a")
    insert_message(db, "b", role="assistant")
    insert_message(db, "c", conversation=C2, user=BOB)
    db.execute(f"DELETE FROM conversations WHERE id = '{C1}'")
    assert db.scalar("SELECT count(*) FROM messages") == 1
    assert db.scalar("SELECT conversation_id::text FROM messages") == C2


def test_deleting_a_user_deletes_everything_of_theirs_archive_included(db):
    insert_message(db, "a")
    insert_message(db, "b", conversation=C2, user=BOB)
    db.execute(
        "INSERT INTO messages_archive (conversation_id, user_id, role, content)"
        f" VALUES ('{A1}', '{ALICE}', 'user', 'old')"
    )
    db.execute(f"INSERT INTO conversations_archive (user_id) VALUES ('{BOB}')")
    before = counts(db)
    db.execute(f"DELETE FROM users WHERE id = '{ALICE}'")
    after = counts(db)
    assert after == {
        "users": before["users"] - 1,
        "conversations": 1,
        "messages": 1,
        "conversations_archive": 1,
        "messages_archive": 0,
    }
    assert db.scalar("SELECT user_id FROM conversations") == BOB
    assert db.scalar("SELECT user_id FROM conversations_archive") == BOB


def test_deleting_an_archived_conversation_deletes_its_archived_messages(db):
    db.execute(
        "INSERT INTO messages_archive (conversation_id, user_id, role, content)"
        f" VALUES ('{A1}', '{ALICE}', 'user', 'old')"
    )
    db.execute(f"DELETE FROM conversations_archive WHERE id = '{A1}'")
    assert db.scalar("SELECT count(*) FROM messages_archive") == 0


def test_runs_allow_one_running_at_a_time(db):
    assert violated(db, "INSERT INTO chatdb_runs (command, outcome) VALUES ('purge', 'paused')") == (
        "chk_chatdb_runs_outcome"
    )
    db.execute("INSERT INTO chatdb_runs (command) VALUES ('purge')")
    assert (
        violated(db, "INSERT INTO chatdb_runs (command) VALUES ('archive')") == "uq_chatdb_runs_one_running"
    )
    db.execute(
        "INSERT INTO chatdb_runs (command, outcome) VALUES ('archive', 'succeeded'), ('purge', 'failed'),"
        " ('purge', 'interrupted')"
    )
    db.execute("UPDATE chatdb_runs SET outcome = 'succeeded' WHERE outcome = 'running'")
    db.execute("INSERT INTO chatdb_runs (command) VALUES ('archive')")
    assert db.scalar("SELECT db_user = current_user FROM chatdb_runs WHERE outcome = 'running'") is True
    with pytest.raises(Exception, match="GENERATED ALWAYS"):
        db.execute("INSERT INTO chatdb_runs (id, command, outcome) VALUES (99, 'purge', 'failed')")
