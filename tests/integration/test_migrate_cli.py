"""What ``chatdb migrate`` shows people: the downgrade plan and its question, a refused
``stamp`` with every difference, and its help texts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_schema_migrations import APP_USERS, SEED_001

from chatdb import migrations
from chatdb.cli import common

CHATDB = str(Path(sys.executable).with_name("chatdb"))


@pytest.fixture
def on_a_terminal(monkeypatch):
    """chatdb asks its question as it would on a terminal (the answer comes as input)."""
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)


def one_line(text: str) -> str:
    """Rich's tables and wrapping folded away: the words in order, single-spaced."""
    return " ".join(re.sub(r"[│┃━─╇╭╮╰╯┼╋┡┩]", " ", text).split())


def test_downgrade_plan_shows_row_counts_with_separators(migrated_db, cli, on_a_terminal):
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations_archive (user_id) VALUES ('u1');"
        " INSERT INTO chatdb_runs (command, outcome)"
        " SELECT 'purge', 'succeeded' FROM generate_series(1, 43811)"
    )
    result = cli("migrate", "down", "0003", "--database-url", migrated_db.cli_url, input="n\n")
    assert result.exit_code == 1, result.output
    shown = one_line(result.stderr)
    assert "chatdb_runs 43,811" in shown
    assert "conversations_archive 1" in shown
    assert "messages_archive 0" in shown
    # The target is 0003.
    assert "Downgrade from 0007_keys_with_user_id to 0004_archive_and_audit" not in shown
    assert (
        "Downgrade from 0007_keys_with_user_id to 0003_chatbot_extensions,"
        " dropping 4 tables holding 43,812 rows? [y/N]"
    ) in shown


def test_downgrade_question_says_one_table_and_one_row(empty_db, cli, on_a_terminal):
    empty_db.execute(APP_USERS)  # the application's users table is never dropped
    migrations.upgrade(empty_db.engine, "0001")
    empty_db.execute("INSERT INTO conversations (user_id) VALUES ('u1')")
    result = cli("migrate", "down", "base", "--database-url", empty_db.cli_url, input="n\n")
    assert result.exit_code == 1, result.output
    assert (
        "Downgrade from 0001_conversations to base (empty), dropping 1 table holding 1 row? [y/N]"
        in one_line(result.stderr)
    )


def test_downgrade_question_names_columns_and_no_empty_counts(migrated_db, cli, on_a_terminal):
    migrations.downgrade(migrated_db.engine, "0005")
    index_only = cli("migrate", "down", "-1", "--database-url", migrated_db.cli_url, input="n\n")
    assert index_only.exit_code == 1, index_only.output
    shown = one_line(index_only.stderr)
    assert "Downgrade from 0005_messages_owner_index to 0004_archive_and_audit? [y/N]" in shown
    assert "table(s)" not in shown and "0 tables" not in shown

    migrations.downgrade(migrated_db.engine, "0003")
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (user_id, title) VALUES ('u1', 'a'), ('u1', 'b')"
    )
    columns = cli("migrate", "down", "-1", "--database-url", migrated_db.cli_url, input="n\n")
    assert columns.exit_code == 1, columns.output
    assert (
        "Downgrade from 0003_chatbot_extensions to 0002_messages, dropping 6 columns holding 2 values? [y/N]"
        in one_line(columns.stderr)
    )


def test_a_refused_stamp_shows_every_difference(empty_db, cli):
    empty_db.execute(SEED_001)
    with pytest.raises(migrations.SchemaMismatch) as raised:
        migrations.stamp(empty_db.engine, "0003")
    differences = raised.value.differences
    assert len(differences) > 5

    # The real program, on a console wide enough for every definition to stay on its line.
    shown = subprocess.run(
        [CHATDB, "migrate", "stamp", "0003", "--database-url", empty_db.cli_url],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        timeout=60,
    )
    assert shown.returncode == 1, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.strip()]
    assert lines[-2] == (
        "error: the live schema does not match revision 0003_chatbot_extensions:"
        f" {len(differences)} differences"
    )
    assert lines[-1].startswith("hint: ")
    assert lines[0] == "The live schema differs from revision 0003_chatbot_extensions"
    header = [cell.strip() for cell in lines[1].split("┃")]
    assert header == ["table", "what", "0003_chatbot_extensions expects", "the database has"]
    rows = [tuple(cell.strip() for cell in line.split("│")) for line in lines[3:-2]]
    assert rows == [
        (
            d.table,
            d.kind if d.kind == "table" or d.name is None else f"{d.kind} {d.name}",
            d.expected or "(none)",
            d.actual or "(none)",
        )
        for d in differences
    ]
    assert not re.search(r"and \d+ more", shown.stderr)
    # Definitions as SQL says them, never as Python tuples or lists.
    assert "('" not in shown.stderr and "True" not in shown.stderr and "['id'" not in shown.stderr
    assert (
        "conversations",
        "index idx_conversations_user_status_updated",
        "CREATE INDEX idx_conversations_user_status_updated ON conversations USING btree"
        " (user_id, status, updated_at DESC)",
        "(none)",
    ) in rows
    assert (
        "messages",
        "constraint chk_message_role",
        "CHECK (role::text = ANY (ARRAY['user'::character varying, 'assistant'::character varying,"
        " 'system'::character varying]::text[]))",
        "CHECK (role::text = ANY (ARRAY['user'::character varying, 'assistant'::character varying]::text[]))",
    ) in rows

    as_json = cli("migrate", "stamp", "0003", "--json", "--database-url", empty_db.cli_url)
    assert as_json.exit_code == 1, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 1
    assert payload["differences"] == [
        {"table": d.table, "kind": d.kind, "name": d.name, "expected": d.expected, "actual": d.actual}
        for d in differences
    ]
    assert migrations.status(empty_db.engine).current is None


def test_sql_help_shows_the_default_of_from_without_a_stray_space(cli):
    result = cli("migrate", "sql", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = one_line(result.stdout)
    assert "Revision the database is at; base is an empty database. [default: base]" in shown
    assert not re.search(r"\w \.", shown), shown
