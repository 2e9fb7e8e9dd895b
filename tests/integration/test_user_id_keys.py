"""Revision 0007 on a database with rows: the primary keys of conversations, messages and
their archives become (id, user_id), online (the new index built concurrently, the swap a
short transaction), and a run interrupted at any step finishes when run again."""

from __future__ import annotations

import threading

from sqlalchemy import text
from test_schema_migrations import snap

from chatdb import migrations

BEFORE = "0006_size_history"
ROWS = (
    "INSERT INTO users (id) SELECT 'u' || n FROM generate_series(1, 20) AS n;"
    " INSERT INTO conversations (id, user_id)"
    "   SELECT ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 'u' || (n % 20 + 1)"
    "   FROM generate_series(1, 400) AS n;"
    " INSERT INTO messages (conversation_id, user_id, role, content)"
    "   SELECT c.id, c.user_id, 'assistant', 'm' || n FROM conversations c, generate_series(1, 20) AS n;"
    " INSERT INTO conversations_archive (id, user_id)"
    "   SELECT ('00000000-0000-4000-9000-' || lpad(n::text, 12, '0'))::uuid, 'u' || (n % 20 + 1)"
    "   FROM generate_series(1, 50) AS n;"
    " INSERT INTO messages_archive (conversation_id, user_id, role, content)"
    "   SELECT c.id, c.user_id, 'user', 'a' || n FROM conversations_archive c, generate_series(1, 4) AS n"
)
KEYS = (
    "SELECT json_object_agg(conrelid::regclass::text, pg_get_constraintdef(oid))"
    " FROM pg_constraint WHERE contype = 'p' AND conrelid::regclass::text"
    " IN ('conversations', 'messages', 'conversations_archive', 'messages_archive')"
)
COUNTS = (
    "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages),"
    " (SELECT count(*) FROM conversations_archive), (SELECT count(*) FROM messages_archive)"
)


def counts(database) -> tuple:
    with database.engine.connect() as connection:
        return tuple(connection.execute(text(COUNTS)).one())


def test_the_keys_move_to_user_id_on_a_database_with_rows_while_the_application_writes(empty_db, migrated_db):
    migrations.upgrade(empty_db.engine, BEFORE)
    empty_db.execute(ROWS)
    stop, written, errors = threading.Event(), [], []

    def write() -> None:
        # The application adds messages to its conversations all along.
        with empty_db.engine.connect() as connection:
            while not stop.is_set():
                try:
                    connection.execute(
                        text(
                            "INSERT INTO messages (conversation_id, user_id, role, content)"
                            " SELECT id, user_id, 'user', 'live' FROM conversations ORDER BY random() LIMIT 1"
                        )
                    )
                    connection.commit()
                    written.append(1)
                except Exception as exc:
                    errors.append(exc)
                    connection.rollback()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        before = counts(empty_db)
        result = migrations.upgrade(empty_db.engine)
    finally:
        stop.set()
        writer.join()
    assert result.applied == ["0007_keys_with_user_id"]
    assert errors == []
    assert written
    after = counts(empty_db)
    assert after[0] == before[0] == 400 and after[2:] == before[2:] == (50, 200)
    assert after[1] >= before[1] >= 8000
    assert empty_db.scalar(KEYS) == {
        "conversations": "PRIMARY KEY (id, user_id)",
        "messages": "PRIMARY KEY (id, user_id)",
        "conversations_archive": "PRIMARY KEY (id, user_id)",
        "messages_archive": "PRIMARY KEY (id, user_id)",
    }
    assert snap(empty_db.engine).differences(snap(migrated_db.engine)) == []
    # The owner key still refuses a message whose user does not own its conversation.
    conversation = empty_db.scalar("SELECT id FROM conversations WHERE user_id = 'u1' LIMIT 1")
    try:
        empty_db.execute(
            "INSERT INTO messages (conversation_id, user_id, role, content) VALUES (:c, 'u2', 'user', 'x')",
            c=conversation,
        )
    except Exception as exc:
        assert "fk_messages_conversation_owner" in str(exc)
    else:
        raise AssertionError("a message of another user's conversation was accepted")


def test_an_interrupted_0007_finishes_when_run_again(empty_db, migrated_db):
    migrations.upgrade(empty_db.engine, BEFORE)
    empty_db.execute(ROWS)
    # Interrupted after the swap of the conversations' key committed, before the messages'
    # new index was valid, and before the version was recorded.
    empty_db.execute(
        "ALTER TABLE messages DROP CONSTRAINT fk_messages_conversation_owner;"
        " ALTER TABLE conversations DROP CONSTRAINT uq_conversations_id_user;"
        " ALTER TABLE conversations DROP CONSTRAINT conversations_pkey;"
        " ALTER TABLE conversations ADD CONSTRAINT conversations_pkey PRIMARY KEY (id, user_id);"
        " ALTER TABLE messages ADD CONSTRAINT fk_messages_conversation_owner FOREIGN KEY"
        "  (conversation_id, user_id) REFERENCES conversations (id, user_id) ON DELETE CASCADE NOT VALID;"
        " CREATE UNIQUE INDEX conversations_pkey_new ON conversations (id, user_id);"
        " CREATE UNIQUE INDEX messages_pkey_new ON messages (id, user_id);"
        " UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'messages_pkey_new'::regclass"
    )
    before = counts(empty_db)
    migrations.upgrade(empty_db.engine)
    assert counts(empty_db) == before
    assert snap(empty_db.engine).differences(snap(migrated_db.engine)) == []
    assert migrations.status(empty_db.engine).up_to_date


def test_0007_down_and_up_again_keeps_every_row(empty_db, migrated_db):
    migrations.upgrade(empty_db.engine)
    empty_db.execute(ROWS)
    before = counts(empty_db)
    migrations.downgrade(empty_db.engine, BEFORE)
    assert empty_db.scalar(KEYS)["conversations"] == "PRIMARY KEY (id)"
    assert (
        empty_db.scalar(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'uq_conversations_id_user'"
        )
        == "UNIQUE (id, user_id)"
    )
    migrations.upgrade(empty_db.engine)
    assert counts(empty_db) == before
    assert snap(empty_db.engine).differences(snap(migrated_db.engine)) == []
