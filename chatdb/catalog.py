"""What the PostgreSQL catalog says about a set of tables, in a form that compares.

Two databases (or two schemas) have "the same schema" when their snapshots are equal:
columns in order with types, nullability, defaults, identity and collation; every
constraint by name and definition; every index by name and definition, validity
included; persistence; the table comment. Definitions come from the server's own
``pg_get_*def`` functions, so nothing is parsed or cleaned up by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class TableSnapshot:
    name: str
    persistence: str
    comment: str | None
    columns: tuple[tuple, ...]
    constraints: tuple[tuple, ...]
    indexes: tuple[tuple, ...]

    def differences(self, other: TableSnapshot) -> list[str]:
        """Human-readable differences, ``self`` being what is expected."""
        found: list[str] = []
        if self.persistence != other.persistence:
            found.append(f"{self.name}: persistence {other.persistence!r}, expected {self.persistence!r}")
        if self.comment != other.comment:
            found.append(f"{self.name}: comment {other.comment!r}, expected {self.comment!r}")
        for kind, mine, theirs in (
            ("column", self.columns, other.columns),
            ("constraint", self.constraints, other.constraints),
            ("index", self.indexes, other.indexes),
        ):
            if kind == "column" and [c[0] for c in mine] != [c[0] for c in theirs]:
                found.append(
                    f"{self.name}: columns {[c[0] for c in theirs]}, expected {[c[0] for c in mine]}"
                )
            expected = {item[0]: item for item in mine}
            actual = {item[0]: item for item in theirs}
            for name in sorted(expected.keys() - actual.keys()):
                found.append(f"{self.name}: missing {kind} {name}")
            for name in sorted(actual.keys() - expected.keys()):
                found.append(f"{self.name}: unexpected {kind} {name}")
            for name in sorted(expected.keys() & actual.keys()):
                if expected[name] != actual[name]:
                    found.append(
                        f"{self.name}: {kind} {name} is {actual[name][1:]}, expected {expected[name][1:]}"
                    )
        return found


@dataclass(frozen=True)
class Snapshot:
    tables: dict[str, TableSnapshot] = field(default_factory=dict)

    def differences(self, actual: Snapshot) -> list[str]:
        """Everything in which ``actual`` differs from this (expected) snapshot."""
        found: list[str] = []
        for name in sorted(self.tables.keys() - actual.tables.keys()):
            found.append(f"missing table {name}")
        for name in sorted(actual.tables.keys() - self.tables.keys()):
            found.append(f"unexpected table {name}")
        for name in sorted(self.tables.keys() & actual.tables.keys()):
            found.extend(self.tables[name].differences(actual.tables[name]))
        return found


_TABLES = text(
    """
    SELECT c.oid, c.relname, c.relpersistence, obj_description(c.oid, 'pg_class'),
           quote_ident(n.nspname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = coalesce(:schema, current_schema())
      AND c.relkind IN ('r', 'p') AND c.relname = ANY(:names)
    """
)
_COLUMNS = text(
    """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
           CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
    """
)
_CONSTRAINTS = text(
    """
    SELECT conname, contype::text, pg_get_constraintdef(oid, true), convalidated,
           condeferrable, condeferred
    FROM pg_constraint WHERE conrelid = :oid ORDER BY conname
    """
)
_INDEXES = text(
    """
    SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = :oid ORDER BY c.relname
    """
)


def snapshot(connection: Connection, names: Iterable[str], schema: str | None = None) -> Snapshot:
    """Snapshot the named tables that exist in ``schema`` (default: the current schema)."""
    tables: dict[str, TableSnapshot] = {}
    rows = connection.execute(_TABLES, {"schema": schema, "names": list(names)}).all()
    for oid, name, persistence, comment, quoted_schema in rows:
        columns = tuple(tuple(r) for r in connection.execute(_COLUMNS, {"oid": oid}))
        constraints = tuple(tuple(r) for r in connection.execute(_CONSTRAINTS, {"oid": oid}))
        # pg_get_indexdef always qualifies the table with its schema; drop exactly that
        # qualifier so snapshots of two schemas compare.
        qualifier = f" ON {quoted_schema}."
        only_qualifier = f" ON ONLY {quoted_schema}."
        indexes = tuple(
            (
                index_name,
                definition.replace(only_qualifier, " ON ONLY ", 1).replace(qualifier, " ON ", 1),
                valid,
                ready,
            )
            for index_name, definition, valid, ready in connection.execute(_INDEXES, {"oid": oid})
        )
        tables[name] = TableSnapshot(name, persistence, comment, columns, constraints, indexes)
    return Snapshot(tables)


def table_names(connection: Connection, schema: str | None = None) -> set[str]:
    """Ordinary tables in ``schema`` (default: the current schema)."""
    return set(
        connection.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = coalesce(:schema, current_schema()) AND c.relkind IN ('r', 'p')"
            ),
            {"schema": schema},
        ).scalars()
    )
