"""What the PostgreSQL catalog says about indexes, in terms that compare across tables; the
indexes ``schema.py`` declares, and their facts as the server builds them; and how two
indexes differ: in definition, or as a duplicate or a left prefix of another.

``verify-indexes`` reads these facts of the live tables and of empty copies on which the
declared indexes were built, and compares them (``chatdb.indexes``). Nothing is parsed
from SQL text: the server describes every key column itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Executable, PrimaryKeyConstraint, Table, UniqueConstraint, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex

from chatdb.errors import one_line
from chatdb.identifiers import quote
from chatdb.schema import CHATDB_TABLES

_CONSTRAINT_KINDS = {"p": "PRIMARY KEY", "u": "UNIQUE", "x": "EXCLUDE"}
#: Statements are rendered for PostgreSQL.
_DIALECT = postgresql.dialect()


# --- catalog facts --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyColumn:
    definition: str  # the column name or expression, as pg_get_indexdef prints it
    column: str | None  # the column's name; None for an expression
    opclass: str
    collation: str | None
    descending: bool
    nulls_first: bool

    def render(self) -> str:
        shown = self.definition + (" DESC" if self.descending else "")
        if self.nulls_first != self.descending:  # not the default for its direction
            shown += " NULLS FIRST" if self.nulls_first else " NULLS LAST"
        return shown


@dataclass(frozen=True)
class IndexFacts:
    """What the catalog says about one index, in terms that compare across tables."""

    table: str
    name: str
    method: str
    unique: bool
    constraint_kind: str | None  # 'p', 'u' or 'x' when the index enforces a constraint
    constraint_name: str | None
    keys: tuple[KeyColumn, ...]
    include: tuple[str, ...]
    predicate: str | None
    valid: bool
    ready: bool

    @property
    def shape(self) -> tuple:
        """Everything that decides which queries the index can serve."""
        return (self.method, self.keys, self.include, self.predicate)

    @property
    def summary(self) -> str:
        """The definition in short: ``UNIQUE btree (a, b DESC) INCLUDE (c) WHERE ...``."""
        shown = f"{'UNIQUE ' if self.unique else ''}{self.method} ({listed(self.keys)})"
        if self.include:
            shown += f" INCLUDE ({', '.join(self.include)})"
        return shown + (f" WHERE {self.predicate}" if self.predicate else "")

    @property
    def enforces(self) -> str | None:
        if self.constraint_kind is None:
            return None
        return f"{_CONSTRAINT_KINDS.get(self.constraint_kind, self.constraint_kind)} {self.constraint_name}"


_TABLES = text(
    """
    SELECT c.relname, c.oid
    FROM pg_class c
    WHERE c.relname = ANY(:names) AND c.relkind IN ('r', 'p')
      AND c.relnamespace = CASE WHEN :temporary THEN pg_my_temp_schema()
          ELSE (SELECT n.oid FROM pg_namespace n WHERE n.nspname = current_schema()) END
    """
)

_INDEXES = text(
    """
    SELECT t.relname, c.relname, am.amname, i.indisunique, con.contype::text, con.conname,
           columns.keys, pg_get_expr(i.indpred, i.indrelid, true), i.indisvalid, i.indisready
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_am am ON am.oid = c.relam
    LEFT JOIN pg_constraint con
      ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
    CROSS JOIN LATERAL (
        SELECT json_agg(json_build_array(
                   n <= i.indnkeyatts,
                   pg_get_indexdef(i.indexrelid, n, true),
                   a.attname,
                   CASE WHEN opc.opcnamespace = 'pg_catalog'::regnamespace THEN opc.opcname
                        ELSE opc.opcnamespace::regnamespace::text || '.' || opc.opcname END,
                   CASE WHEN i.indcollation[n - 1] <> 0 THEN i.indcollation[n - 1]::regcollation::text END,
                   (i.indoption[n - 1] & 1) <> 0,
                   (i.indoption[n - 1] & 2) <> 0
               ) ORDER BY n) AS keys
        FROM generate_series(1, i.indnatts::int) AS n
        LEFT JOIN pg_attribute a
          ON a.attrelid = i.indrelid AND a.attnum = i.indkey[n - 1] AND a.attnum > 0
        LEFT JOIN pg_opclass opc ON n <= i.indnkeyatts AND opc.oid = i.indclass[n - 1]
    ) columns
    WHERE i.indrelid = ANY(:oids)
    ORDER BY t.relname, c.relname
    """
)

_FOREIGN_KEYS = text(
    """
    SELECT t.relname, con.conname,
           ARRAY(SELECT a.attname
                 FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, n)
                 JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                 ORDER BY k.n) AS columns,
           con.confrelid::regclass::text
    FROM pg_constraint con
    JOIN pg_class t ON t.oid = con.conrelid
    WHERE con.contype = 'f' AND con.conrelid = ANY(:oids)
    ORDER BY t.relname, con.conname
    """
)


@dataclass(frozen=True)
class ForeignKey:
    table: str
    name: str
    columns: tuple[str, ...]
    references: str


def table_oids(connection: Connection, names: Iterable[str], *, temporary: bool) -> dict[str, int]:
    rows = connection.execute(_TABLES, {"names": list(names), "temporary": temporary})
    return {name: oid for name, oid in rows}


def read_index_facts(connection: Connection, oids: Iterable[int]) -> dict[str, dict[str, IndexFacts]]:
    """Facts of every index on the given tables: {table: {index: facts}}."""
    found: dict[str, dict[str, IndexFacts]] = {}
    for row in connection.execute(_INDEXES, {"oids": list(oids)}):
        table, name, method, unique, kind, constraint, columns, predicate, valid, ready = row
        keys = tuple(
            KeyColumn(shown, column, opclass, collation, descending, nulls_first)
            for is_key, shown, column, opclass, collation, descending, nulls_first in columns
            if is_key
        )
        include = tuple(shown for is_key, shown, *_ in columns if not is_key)
        found.setdefault(table, {})[name] = IndexFacts(
            table, name, method, unique, kind, constraint, keys, include, predicate, valid, ready
        )
    return found


def read_foreign_keys(connection: Connection, oids: Iterable[int]) -> list[ForeignKey]:
    return [
        ForeignKey(table, name, tuple(columns), references)
        for table, name, columns, references in connection.execute(_FOREIGN_KEYS, {"oids": list(oids)})
    ]


# --- what schema.py declares ------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """An index schema.py declares (an Index, or one a primary key or unique constraint
    enforces), with the statement that builds it on a scratch copy and the statements that
    create or drop it on a live table."""

    table: str
    name: str
    build: Executable  # an executable DDL element or text()
    create: str
    drop: str


def declared_indexes() -> list[Declared]:
    """Every index of chatdb's tables that schema.py declares, rendered without touching
    ``schema.metadata``."""
    # A compiler for its process() alone: it has no statement of its own.
    compiler = _DIALECT.ddl_compiler(_DIALECT, None)  # type: ignore[arg-type]
    found = []
    for table in CHATDB_TABLES:
        name_of_table = quote(table.name)
        for constraint in _index_constraints(table):
            assert isinstance(constraint.name, str)  # schema.py names every constraint
            name = quote(constraint.name)
            kind = "PRIMARY KEY" if isinstance(constraint, PrimaryKeyConstraint) else "UNIQUE"
            columns = ", ".join(quote(column.name) for column in constraint.columns)
            found.append(
                Declared(
                    table.name,
                    constraint.name,
                    text(f"ALTER TABLE {name_of_table} ADD {compiler.process(constraint)}"),
                    f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {name_of_table} ({columns});\n"
                    f"ALTER TABLE {name_of_table} ADD CONSTRAINT {name} {kind} USING INDEX {name};",
                    f"ALTER TABLE {name_of_table} DROP CONSTRAINT {name};",
                )
            )
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            assert index.name is not None  # schema.py names every index
            found.append(
                Declared(
                    table.name,
                    index.name,
                    CreateIndex(index),
                    _concurrently(str(CreateIndex(index).compile(dialect=_DIALECT))) + ";",
                    f"DROP INDEX CONCURRENTLY {quote(index.name)};",
                )
            )
    return found


def _index_constraints(table: Table) -> list[PrimaryKeyConstraint | UniqueConstraint]:
    keys: list = [table.primary_key] if table.primary_key.columns else []
    unique = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
    return keys + sorted(unique, key=lambda constraint: str(constraint.name))


def _concurrently(statement: str) -> str:
    return re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", statement.strip())


def expected_facts(
    connection: Connection, declared: list[Declared], tables: Iterable[str]
) -> tuple[dict[str, dict[str, IndexFacts]], dict[str, str]]:
    """Build the declared indexes on empty temporary copies of the live tables and read
    their facts back, with the error of each one the live columns cannot hold. Runs
    inside the caller's transaction, which must be rolled back."""
    live_schema = connection.execute(text("SELECT current_schema()")).scalar_one()
    tables = list(tables)
    for table in tables:
        connection.execute(
            text(f"CREATE TEMPORARY TABLE {quote(table)} (LIKE {quote(live_schema)}.{quote(table)})")
        )
    # From here on, unqualified table names are the temporary copies (functions still
    # resolve in the live schema), so the declared DDL builds on them unchanged.
    connection.execute(
        text("SELECT set_config('search_path', 'pg_temp, ' || quote_ident(:schema), true)"),
        {"schema": live_schema},
    )
    errors: dict[str, str] = {}
    for item in declared:
        if item.table not in tables:
            continue
        savepoint = connection.begin_nested()
        try:
            connection.execute(item.build)
        except DBAPIError as exc:
            savepoint.rollback()
            errors[item.name] = one_line(exc)
        else:
            savepoint.commit()
    facts = read_index_facts(connection, table_oids(connection, tables, temporary=True).values())
    return facts, errors


# --- comparing ------------------------------------------------------------------------------


def definition_differences(expected: IndexFacts, live: IndexFacts) -> list[str]:
    """How ``live`` differs from ``expected``, one phrase per aspect."""
    found = []
    if live.method != expected.method:
        found.append(f"access method {live.method}, expected {expected.method}")
    live_keys = [key.definition for key in live.keys]
    expected_keys = [key.definition for key in expected.keys]
    if live_keys != expected_keys:
        order = (
            "key columns in another order" if sorted(live_keys) == sorted(expected_keys) else "key columns"
        )
        found.append(f"{order}: ({listed(live.keys)}), expected ({listed(expected.keys)})")
    else:
        for mine, theirs in zip(expected.keys, live.keys, strict=True):
            if theirs.descending != mine.descending:
                found.append(f"{theirs.definition} {_direction(theirs)}, expected {_direction(mine)}")
            if (theirs.nulls_first != theirs.descending) != (mine.nulls_first != mine.descending):
                found.append(f"{theirs.definition} {_nulls(theirs)}, expected {_nulls(mine)}")
            if theirs.opclass != mine.opclass:
                found.append(f"{theirs.definition} operator class {theirs.opclass}, expected {mine.opclass}")
            if theirs.collation != mine.collation:
                found.append(
                    f"{theirs.definition} collation {theirs.collation or 'none'}, "
                    f"expected {mine.collation or 'none'}"
                )
    if live.include != expected.include:
        found.append(f"{_include(live.include)}, expected {_include(expected.include)}")
    if live.predicate != expected.predicate:
        found.append(f"{_predicate(live.predicate)}, expected {_predicate(expected.predicate)}")
    if live.unique != expected.unique:
        found.append("not unique, expected UNIQUE" if expected.unique else "UNIQUE, expected not unique")
    if live.enforces != expected.enforces:
        found.append(
            f"enforces {live.enforces or 'no constraint'}, expected {expected.enforces or 'no constraint'}"
        )
    return found


def listed(keys: Iterable[KeyColumn]) -> str:
    return ", ".join(key.render() for key in keys)


def _direction(key: KeyColumn) -> str:
    return "DESC" if key.descending else "ASC"


def _nulls(key: KeyColumn) -> str:
    return "NULLS FIRST" if key.nulls_first else "NULLS LAST"


def _include(columns: tuple[str, ...]) -> str:
    return f"INCLUDE ({', '.join(columns)})" if columns else "no INCLUDE columns"


def _predicate(predicate: str | None) -> str:
    return f"partial WHERE {predicate}" if predicate else "no predicate"


def _rank(index: IndexFacts, expected: set[str]) -> tuple:
    """Which of two interchangeable indexes to keep: a constraint's, a unique one, a
    declared one, then the first by name."""
    return (index.constraint_kind is None, not index.unique, index.name not in expected, index.name)


def duplicate_of(index: IndexFacts, others: list[IndexFacts], expected: set[str]) -> IndexFacts | None:
    """The index that makes ``index`` an exact duplicate, if any. An index that enforces
    a constraint is never the duplicate."""
    if index.constraint_kind is not None:
        return None
    twins = [
        other
        for other in others
        if other.valid and other.shape == index.shape and _rank(other, expected) < _rank(index, expected)
    ]
    return min(twins, key=lambda other: _rank(other, expected), default=None)


def prefix_of(index: IndexFacts, others: list[IndexFacts], expected: set[str]) -> IndexFacts | None:
    """The btree index whose key columns start with all of ``index``'s (same options, same
    predicate) and that holds its INCLUDE columns too. Unique indexes enforce something
    narrower, so they are never redundant."""
    if index.unique or index.constraint_kind is not None or index.method != "btree":
        return None
    width = len(index.keys)
    wider = [
        other
        for other in others
        if other.valid
        and other.method == index.method
        and other.predicate == index.predicate
        and len(other.keys) > width
        and other.keys[:width] == index.keys
        and set(index.include) <= {key.definition for key in other.keys} | set(other.include)
    ]
    return min(wider, key=lambda other: _rank(other, expected), default=None)
