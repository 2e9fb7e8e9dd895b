"""Another session's SQL as doctor shows it: every string constant as '…', whatever way
PostgreSQL lets it be written, and nothing that follows a quote taken for another kind."""

from __future__ import annotations

import pytest

from chatdb.doctor.query_text import without_constants


@pytest.mark.parametrize(
    ("sql", "shown"),
    [
        ("SELECT 'hunter2'", "SELECT '…'"),
        ("ALTER ROLE app PASSWORD 'a''hunter2'", "ALTER ROLE app PASSWORD '…'"),
        ("SELECT E'it\\'s hunter2'", "SELECT E'…'"),
        ("SELECT $$hunter2$$, 1", "SELECT '…', 1"),
        ("SELECT $pw$it's $$ hunter2$pw$ AS x", "SELECT '…' AS x"),
        ("DO $$BEGIN PERFORM dblink_connect('password=hunter2'); END$$", "DO '…'"),
        ("SELECT U&'hunter2', B'101', X'ff'", "SELECT U&'…', B'…', X'…'"),
        ("SELECT e'it\\'s', $$hunter2$$", "SELECT e'…', '…'"),
        # A parameter, and an identifier holding $, open no dollar quote.
        ("SELECT $1, a$b$ FROM t WHERE x = 'hunter2'", "SELECT $1, a$b$ FROM t WHERE x = '…'"),
        # Quotes inside comments and quoted identifiers start nothing.
        ("SELECT 1 -- it's\n, 'hunter2'", "SELECT 1 -- it's\n, '…'"),
        ("SELECT /* it's /* nested's */ still */ 'hunter2'", "SELECT /* it's /* nested's */ still */ '…'"),
        ("SELECT \"it's\" FROM t WHERE p = 'hunter2'", "SELECT \"it's\" FROM t WHERE p = '…'"),
        # Cut short by track_activity_query_size: hidden to the end.
        ("SELECT 'hunter2 and the rest", "SELECT '…'"),
        ("SELECT $x$hunter2 and the rest", "SELECT '…'"),
        ("SELECT 1", "SELECT 1"),
        ("", ""),
    ],
)
def test_each_constant_shows_as_an_ellipsis(sql, shown):
    assert without_constants(sql) == shown


@pytest.mark.parametrize(
    "sql",
    [
        # With standard_conforming_strings on, 'a\' ends at the second quote and
        # 'hunter2' is a constant of its own.
        "SELECT 'a\\' || 'hunter2'",
        # With it off (or in E''), \' is a quote inside the constant.
        "SELECT 'it\\'s hunter2'",
        "SELECT 'it\\'s', 'hunter2'",
        "SELECT E'a\\\\' || 'hunter2'",
    ],
)
def test_a_backslash_hides_either_way_since_doctor_cannot_see_the_setting(sql):
    assert "hunter2" not in without_constants(sql)


def test_the_rest_of_the_query_is_kept():
    sql = "UPDATE conversations SET title = 'hunter2' WHERE id = $1 AND user_id = 'u1'"
    assert without_constants(sql) == "UPDATE conversations SET title = '…' WHERE id = $1 AND user_id = '…'"
