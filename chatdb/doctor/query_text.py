"""Another session's SQL, shown with every string constant as '…'.

A password in ``ALTER ROLE ... PASSWORD '...'``, in a dblink connection string or in a
``DO`` block's body is a string constant; doctor prints the shape of a query, never its
values. PostgreSQL writes constants in several ways, and a scanner that missed one would
print what follows a quote it took for the end: ``'...'`` (a doubled ``''`` inside),
``E'...'`` (backslash escapes), ``$$...$$`` and ``$tag$...$tag$``, the ``U&``, ``B``
and ``X`` forms. Comments and quoted identifiers are skipped, so that a quote inside them
starts nothing.

Whether a backslash escapes a quote in a plain ``'...'`` (not ``E'...'``) depends on the
other session's ``standard_conforming_strings``, which doctor cannot see; the text is
scanned both ways, and whatever either scan takes for a constant is hidden. A constant left open (the server
cuts a long query at ``track_activity_query_size``) is hidden to the end.

Hand-written: a SQL parser (pglast, sqlparse) either refuses a query cut short or lexes
backslashes one way only."""

from __future__ import annotations

import re

#: A dollar quote's opening tag: ``$$`` or ``$name$`` (``$1`` is a parameter).
_DOLLAR = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
#: A keyword, an identifier or a number; identifiers may hold ``$`` after their first
#: character, so ``a$b$`` opens no dollar quote.
_WORD = re.compile(r"[A-Za-z0-9_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")

SHOWN = "'…'"


def without_constants(sql: str) -> str:
    """``sql`` with each string constant (and anything that might be one) as '…'."""
    spans = sorted(_constants(sql, backslash_escapes=False) + _constants(sql, backslash_escapes=True))
    parts = []
    shown = 0
    for start, end in spans:
        if end <= shown:
            continue
        if start >= shown:
            parts.append(sql[shown:start])
            parts.append(SHOWN)
        shown = end
    parts.append(sql[shown:])
    return "".join(parts)


def _constants(sql: str, *, backslash_escapes: bool) -> list[tuple[int, int]]:
    """Where the string constants are, start and end, when a backslash in ``'...'``
    escapes (``backslash_escapes``) or does not."""
    spans = []
    at, size = 0, len(sql)
    word = (0, 0)  # where the last keyword, identifier or number stood
    while at < size:
        char = sql[at]
        if sql.startswith("--", at):
            newline = sql.find("\n", at)
            at = size if newline < 0 else newline + 1
        elif sql.startswith("/*", at):
            at = _comment_end(sql, at)
        elif char == '"':
            at = _quoted_end(sql, at, '"', backslash_escapes=False)
        elif char == "'":
            # E'...' escapes with backslashes whatever the setting.
            escape = word[1] == at and sql[word[0] : word[1]] in ("E", "e")
            end = _quoted_end(sql, at, "'", backslash_escapes=backslash_escapes or escape)
            spans.append((at, end))
            at = end
        elif char == "$" and (tag := _DOLLAR.match(sql, at)):
            close = sql.find(tag.group(), tag.end())
            end = size if close < 0 else close + len(tag.group())
            spans.append((at, end))
            at = end
        elif found := _WORD.match(sql, at):
            word = found.span()
            at = found.end()
        else:
            at += 1
    return spans


def _quoted_end(sql: str, start: int, quote: str, *, backslash_escapes: bool) -> int:
    """Where the quoted text opened at ``start`` ends (a doubled quote continues it)."""
    at = start + 1
    while at < len(sql):
        if backslash_escapes and sql[at] == "\\":
            at += 2
        elif sql[at] != quote:
            at += 1
        elif sql.startswith(quote, at + 1):
            at += 2
        else:
            return at + 1
    return len(sql)


def _comment_end(sql: str, start: int) -> int:
    """Where the ``/* */`` comment opened at ``start`` ends (they nest)."""
    depth, at = 0, start
    while at < len(sql):
        if sql.startswith("/*", at):
            depth, at = depth + 1, at + 2
        elif sql.startswith("*/", at):
            depth, at = depth - 1, at + 2
            if not depth:
                return at
        else:
            at += 1
    return len(sql)
