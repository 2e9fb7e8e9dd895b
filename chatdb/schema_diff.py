"""How a live schema differs from the one a revision builds, described as SQL would.

``migrate stamp`` refuses with these differences, and the test of the chain compares head
with ``schema.metadata.create_all()`` through them. Both sides are catalog snapshots, made
of the server's own definitions, so nothing is parsed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatdb import catalog


@dataclass(frozen=True)
class SchemaDifference:
    """One way the live schema differs from what a revision builds. ``expected`` is what
    the revision has, ``actual`` what the database has; None where one has no such
    object."""

    table: str
    kind: str  # "table", "column", "column order", "constraint", "index", "comment", "persistence"
    name: str | None
    expected: str | None
    actual: str | None

    def __str__(self) -> str:
        subject = f"{self.kind} {self.name}" if self.name else self.kind
        where = "" if self.kind == "table" else f"{self.table}: "
        if self.actual is None:
            return f"{where}missing {subject}"
        if self.expected is None:
            return f"{where}unexpected {subject}"
        return f"{where}{subject} is {self.actual}, expected {self.expected}"


def schema_differences(expected: catalog.Snapshot, actual: catalog.Snapshot) -> list[SchemaDifference]:
    """Every way ``actual`` differs from ``expected``, as ``catalog.Snapshot.differences``
    finds them, each with what both sides have, described as SQL would."""
    found = [
        SchemaDifference(name, "table", name, "exists", None)
        for name in sorted(expected.tables.keys() - actual.tables.keys())
    ]
    found += [
        SchemaDifference(name, "table", name, None, "exists")
        for name in sorted(actual.tables.keys() - expected.tables.keys())
    ]
    for name in sorted(expected.tables.keys() & actual.tables.keys()):
        found += _table_differences(expected.tables[name], actual.tables[name])
    return found


def _table_differences(
    expected: catalog.TableSnapshot, actual: catalog.TableSnapshot
) -> list[SchemaDifference]:
    table = expected.name
    found = []
    if expected.persistence != actual.persistence:
        names = {"p": "permanent", "u": "unlogged", "t": "temporary"}
        found.append(
            SchemaDifference(
                table,
                "persistence",
                None,
                names.get(expected.persistence, expected.persistence),
                names.get(actual.persistence, actual.persistence),
            )
        )
    if expected.comment != actual.comment:
        found.append(
            SchemaDifference(table, "comment", None, _quoted(expected.comment), _quoted(actual.comment))
        )
    expected_order = [column[0] for column in expected.columns]
    actual_order = [column[0] for column in actual.columns]
    if expected_order != actual_order:
        found.append(
            SchemaDifference(table, "column order", None, ", ".join(expected_order), ", ".join(actual_order))
        )
    for kind, mine, theirs, describe in (
        ("column", expected.columns, actual.columns, _describe_column),
        ("constraint", expected.constraints, actual.constraints, _describe_constraint),
        ("index", expected.indexes, actual.indexes, _describe_index),
    ):
        wanted = {item[0]: item for item in mine}
        present = {item[0]: item for item in theirs}
        for name in sorted(wanted.keys() | present.keys()):
            if wanted.get(name) != present.get(name):
                found.append(
                    SchemaDifference(
                        table,
                        kind,
                        name,
                        describe(wanted[name]) if name in wanted else None,
                        describe(present[name]) if name in present else None,
                    )
                )
    return found


def _quoted(comment: str | None) -> str:
    return "no comment" if comment is None else "'" + comment.replace("'", "''") + "'"


def _describe_column(column: tuple) -> str:
    # catalog's columns: name, type, not null, default, identity, generated, collation
    _, type_, not_null, default, identity, generated, collation = column
    text_ = type_ + (f" COLLATE {collation}" if collation else "")
    if generated:
        text_ += f" GENERATED ALWAYS AS ({default}) STORED"
    elif default is not None:
        text_ += f" DEFAULT {default}"
    if identity:
        text_ += f" GENERATED {'ALWAYS' if identity == 'a' else 'BY DEFAULT'} AS IDENTITY"
    return text_ + (" NOT NULL" if not_null else " NULL")


def _describe_constraint(constraint: tuple) -> str:
    # catalog's constraints: name, type, definition, validated, deferrable, deferred
    _, _, definition, validated, deferrable, deferred = constraint
    text_ = definition
    if not validated and "NOT VALID" not in definition:
        text_ += " NOT VALID"
    if deferrable and "DEFERRABLE" not in definition:
        text_ += " DEFERRABLE" + (" INITIALLY DEFERRED" if deferred else "")
    return text_


def _describe_index(index: tuple) -> str:
    # catalog's indexes: name, definition, valid, ready
    _, definition, valid, ready = index
    return definition + ("" if valid else " (invalid)") + ("" if ready else " (not ready)")
