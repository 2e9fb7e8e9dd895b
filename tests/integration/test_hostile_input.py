"""Input that looks like Rich markup is shown as typed, never read as markup."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("raw", ["[/x]", "[bold]90d", "[red]x[/red]"])
def test_markup_in_an_argument_is_shown_as_typed(cli, migrated_db, raw):
    result = cli("purge", "--older-than", raw, "--database-url", migrated_db.cli_url)
    assert result.exit_code == 2, result.output
    assert raw in result.stderr
    assert "Traceback" not in result.output


def test_markup_in_a_user_id_is_shown_as_typed(cli, migrated_db):
    result = cli("archive", "restore", "--user", "[bold]u[/bold]", "--database-url", migrated_db.cli_url)
    assert result.exit_code == 1, result.output
    assert "[bold]u[/bold]" in result.stderr
