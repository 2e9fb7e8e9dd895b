"""Identifiers as the statements chatdb prints name them: quoted only where PostgreSQL
needs it, so that a fix or a GRANT reads as a DBA would write it and runs as printed."""

from __future__ import annotations

import re

from sqlalchemy.dialects.postgresql.base import RESERVED_WORDS

#: PostgreSQL's keywords that a bare identifier cannot be everywhere: its reserved ones and
#: those reserved as a type, a function or a column name (``pg_get_keywords()`` of
#: PostgreSQL 18, categories R, T and C), and SQLAlchemy's list besides.
_PG_KEYWORDS = """
all analyse analyze and any array as asc asymmetric authorization between bigint binary
bit boolean both case cast char character check coalesce collate collation column
concurrently constraint create cross current_catalog current_date current_role
current_schema current_time current_timestamp current_user dec decimal default
deferrable desc distinct do else end except exists extract false fetch float for foreign
freeze from full grant greatest group grouping having ilike in initially inner inout int
integer intersect interval into is isnull join json json_array json_arrayagg json_exists
json_object json_objectagg json_query json_scalar json_serialize json_table json_value
lateral leading least left like limit localtime localtimestamp merge_action national
natural nchar none normalize not notnull null nullif numeric offset on only or order out
outer overlaps overlay placing position precision primary real references returning
right row select session_user setof similar smallint some substring symmetric
system_user table tablesample then time timestamp to trailing treat trim true union
unique user using values varchar variadic verbose when where window with xmlattributes
xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot
xmlserialize xmltable
"""
KEYWORDS = frozenset(_PG_KEYWORDS.split()) | frozenset(RESERVED_WORDS)

_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


def quote(name: str) -> str:
    """``name`` as an SQL identifier: bare when it is lower case letters, digits, ``_`` and
    ``$`` and not a keyword, else in double quotes (a ``"`` in it doubled). Never through a
    driver's escaping, which would double a ``%``."""
    if _PLAIN.fullmatch(name) and name not in KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'
