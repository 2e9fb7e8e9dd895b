"""`chatdb status`: the row counts of large tables are the planner's estimate."""

from __future__ import annotations

import json

import pytest


def rows_shown(text_output: str, table: str) -> str:
    """The rows column of ``table``'s line in status's table."""
    (cells,) = [
        cells
        for cells in ([cell.strip() for cell in line.split("│")] for line in text_output.splitlines())
        if cells[0] == table
    ]
    return cells[1]


@pytest.mark.parametrize(
    ("estimate", "shown"),
    [(2_000_000, "~2,000,000"), (1_000_001, "~1,000,001"), (1_000_000, "3")],
    ids=["two million", "just over a million", "a million"],
)
def test_a_table_of_more_than_a_million_rows_shows_the_planners_estimate(migrated_db, cli, estimate, shown):
    """README, `chatdb status`: "Tables with more than a million rows show the planner's
    estimate (`~`) instead of counting". The table holds 3 rows and the planner believes it
    holds ``estimate`` (set in the catalog, as ANALYZE would)."""
    migrated_db.execute(
        "INSERT INTO users (id) VALUES ('u1');"
        " INSERT INTO conversations (user_id) VALUES ('u1');"
        " INSERT INTO messages (conversation_id, user_id, role, content)"
        " SELECT id, user_id, 'user', 'hi' FROM conversations, generate_series(1, 3)"
    )
    migrated_db.execute(
        "UPDATE pg_class SET reltuples = :estimate WHERE oid = 'messages'::regclass", estimate=estimate
    )
    estimated = estimate > 1_000_000

    result = cli("status", "--json", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 0, result.output
    tables = {table["name"]: table for table in json.loads(result.stdout)["tables"]}
    assert tables["messages"]["rows"] == (estimate if estimated else 3)
    assert tables["messages"]["rows_exact"] is not estimated
    assert (tables["conversations"]["rows"], tables["conversations"]["rows_exact"]) == (1, True)

    result = cli("status", "--database-url", migrated_db.cli_url, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert rows_shown(result.stdout, "messages") == shown
    assert rows_shown(result.stdout, "conversations") == "1"
