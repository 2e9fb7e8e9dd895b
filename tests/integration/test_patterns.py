"""The query patterns of chatdb.patterns run, return what they promise, and each is
served by the index it names (EXPLAIN on the very statement, sequential scans off)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from chatdb import indexes, patterns, schema


def _plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.parametrize("pattern", patterns.PATTERNS, ids=lambda p: p.name)
def test_each_pattern_is_served_by_its_index(migrated_db, pattern):
    with migrated_db.engine.begin() as connection:
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            connection.execute(text(f"SET LOCAL {setting} = off"))
        plan = indexes.explain(connection, pattern)
        connection.rollback()
    nodes = list(_plan_nodes(plan))
    assert pattern.index in {node.get("Index Name") for node in nodes}, nodes
    if pattern.ordered:
        assert not any("Sort" in node["Node Type"] for node in nodes), nodes


def test_every_named_index_exists_in_schema():
    declared = {index.name for table in schema.metadata.tables.values() for index in table.indexes}
    assert {pattern.index for pattern in patterns.PATTERNS} <= declared


def test_add_message_bumps_updated_at_and_reads_back_newest_first(migrated_db):
    migrated_db.execute("INSERT INTO users (id) VALUES ('u1')")
    with migrated_db.engine.begin() as connection:
        conversation_id = connection.execute(
            text(
                "INSERT INTO conversations (user_id, updated_at)"
                " VALUES ('u1', now() - interval '1 day') RETURNING id"
            )
        ).scalar_one()
    with migrated_db.engine.connect() as connection:
        first = patterns.add_message(connection, conversation_id, "u1", "user", "hello")
        second = patterns.add_message(connection, conversation_id, "u1", "assistant", "hi there")
        history = connection.execute(patterns.conversation_history(conversation_id)).all()
        recent = connection.execute(patterns.recent_conversations("u1")).all()
    assert [row.id for row in history] == [second, first]
    assert [row.id for row in recent] == [conversation_id]
    idle_seconds = migrated_db.scalar(
        "SELECT extract(epoch FROM now() - updated_at) FROM conversations WHERE id = :id",
        id=conversation_id,
    )
    assert idle_seconds < 3600


def test_deleting_a_conversation_probes_the_owner_index_not_all_of_the_owners_messages(migrated_db):
    """The cascade of the owner foreign key runs with a generic plan. On data where one
    user owns most messages, it must still be one probe of
    idx_messages_conversation_owner, not a BitmapAnd with the user's index."""
    db = migrated_db
    db.execute("INSERT INTO users (id) SELECT 'u' || g FROM generate_series(1, 50) g")
    db.execute(
        "INSERT INTO conversations (user_id) SELECT CASE WHEN g % 10 = 0 THEN 'u' || (g % 50 + 1)"
        " ELSE 'u1' END FROM generate_series(1, 2000) g"
    )
    db.execute(
        "INSERT INTO messages (conversation_id, user_id, role, content)"
        " SELECT c.id, c.user_id, 'user', 'hi' FROM conversations c, generate_series(1, 10)"
    )
    db.execute("ANALYZE")
    with db.engine.connect() as connection:
        # The cascade's own statement, planned as a generic plan would be.
        raw = connection.exec_driver_sql(
            "EXPLAIN (GENERIC_PLAN, FORMAT JSON)"
            " DELETE FROM ONLY messages WHERE $1 = conversation_id AND $2 = user_id"
        ).scalar_one()
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes = list(_plan_nodes(plan))
    assert {node.get("Index Name") for node in nodes} - {None} == {"idx_messages_conversation_owner"}, nodes
