"""Adding a constraint back (seed's rebuild, the Citus distribution) renders its SQL
without changing ``schema.metadata``, whose ``create_all`` must go on holding every
constraint inline."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from chatdb import schema


def create_table_sql(table) -> str:
    return str(CreateTable(table).compile(dialect=postgresql.dialect()))


def test_adding_a_constraint_back_leaves_create_all_whole():
    before = {table.name: create_table_sql(table) for table in schema.metadata.sorted_tables}
    statements = [
        schema.add_constraint_sql(constraint)
        for table in schema.metadata.sorted_tables
        for constraint in table.constraints
    ]
    after = {table.name: create_table_sql(table) for table in schema.metadata.sorted_tables}
    assert after == before
    assert "CONSTRAINT fk_messages_conversation_owner FOREIGN KEY" in after["messages"]
    owner = next(s for s in statements if "fk_messages_conversation_owner" in s)
    assert owner.startswith("ALTER TABLE messages ADD CONSTRAINT fk_messages_conversation_owner FOREIGN KEY")
    assert "REFERENCES conversations (id, user_id)" in owner
