"""Schema migrations: a plain Python API over chatdb's Alembic chain.

Every function takes an Engine (or nothing, for the offline ones), returns a small result
object and never prints. The chain is linear; revisions are addressed by id, by a unique
prefix of an id, by ``head``/``base``, or relative to the current revision (``-1``).
"""

from __future__ import annotations

import io
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from chatdb import catalog, privileges
from chatdb.errors import StateError, UsageError, one_line
from chatdb.schema import CHATDB_TABLES, HEAD_REVISION, USERS_CREATED_BY_CHATDB, VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic is imported by the functions that run or read the chain, not at import time:
# the commands that only need to know the database is at head (seed, archive, purge)
# start without it.

BASE = "base"
#: How long a migration waits for a table lock before failing (instead of queueing the
#: application's queries behind its lock request).
DEFAULT_LOCK_TIMEOUT = "5s"
_OWNED = tuple(table.name for table in CHATDB_TABLES)


@dataclass(frozen=True)
class Revision:
    id: str
    down: str | None
    message: str


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    head: str
    pending: list[Revision]
    known: bool  # False when the database is at a revision this chatdb does not know

    @property
    def up_to_date(self) -> bool:
        return self.known and not self.pending


@dataclass(frozen=True)
class MigrateResult:
    previous: str | None
    current: str | None
    applied: list[str]
    elapsed: float
    #: On Citus: the tables this run distributed (chatdb.citus.distribute).
    distributed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TableDrop:
    table: str
    rows: int


@dataclass(frozen=True)
class ColumnDrop:
    table: str
    column: str
    values: int  # rows holding a non-null value, lost with the column


@dataclass(frozen=True)
class DowngradePlan:
    current: str
    target: str | None
    revisions: list[str]
    tables: list[TableDrop] = field(default_factory=list)
    columns: list[ColumnDrop] = field(default_factory=list)


# --- the chain --------------------------------------------------------------------------


def script_location() -> Path:
    """The migration scripts: inside the installed package, or at the top of a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StateError(f"chatdb's migration scripts are missing (looked in {package})")


def _config(
    connection: Connection | None = None, *, output_buffer: io.StringIO | None = None, **attributes: object
) -> Config:
    from alembic.config import Config

    attributes.setdefault("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    config = Config(output_buffer=output_buffer or io.StringIO())
    config.set_main_option("script_location", str(script_location()))
    if connection is not None:
        config.attributes["connection"] = connection
    config.attributes.update(attributes)
    return config


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def chain() -> list[Revision]:
    """Every revision, oldest first."""
    revisions = []
    for script in reversed(list(_script().walk_revisions())):
        message = (script.doc or "").strip().splitlines()[0] if script.doc else ""
        down = script.down_revision
        assert down is None or isinstance(down, str)  # the chain is linear: no merge revisions
        revisions.append(Revision(script.revision, down, message))
    return revisions


def head() -> str:
    return chain()[-1].id


def resolve(spec: str, current: str | None = None) -> str | None:
    """An absolute revision id (None for base) from an id, a unique prefix, ``head``,
    ``base`` or ``-N``/``+N`` relative to ``current``."""
    ids = [revision.id for revision in chain()]
    spec = spec.strip()
    if spec == BASE:
        return None
    if spec == "head":
        return ids[-1]
    if spec[:1] in "+-" and spec[1:].isdigit():
        position = ids.index(current) + 1 if current in ids else 0
        target = position + int(spec)
        if not 0 <= target <= len(ids):
            raise UsageError(f"revision {spec} is out of range (the chain has {len(ids)} revisions)")
        return ids[target - 1] if target else None
    matches = [rev for rev in ids if rev == spec] or [rev for rev in ids if rev.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"revision {spec!r} is ambiguous: {', '.join(matches)}")
    raise UsageError(f"unknown revision {spec!r}; `chatdb migrate history` lists them")


def _position(revision: str | None) -> int:
    return 0 if revision is None else [r.id for r in chain()].index(revision) + 1


# --- reading the database ----------------------------------------------------------------


def current_revision(connection: Connection) -> str | None:
    """The revision in the version table (None when there is none). The chain is linear,
    so the table holds one row at most."""
    if connection.execute(text("SELECT to_regclass(:table)"), {"table": VERSION_TABLE}).scalar() is None:
        return None
    return connection.execute(text(f'SELECT version_num FROM "{VERSION_TABLE}" LIMIT 1')).scalar()


def status(engine: Engine) -> MigrationStatus:
    with engine.connect() as connection:
        current = current_revision(connection)
    revisions = chain()
    ids = [revision.id for revision in revisions]
    if current is not None and current not in ids:
        return MigrationStatus(current, ids[-1], [], known=False)
    pending = revisions[_position(current) :]
    return MigrationStatus(current, ids[-1], pending, known=True)


def unknown_revision(current: str) -> StateError:
    return StateError(
        f"the database is at revision {current!r}, which this chatdb does not know "
        "(was it migrated by a newer chatdb?)",
        hint="upgrade chatdb, or check that --database-url points at the right database",
    )


def require_head(engine: Engine) -> None:
    """Raise StateError unless the database is migrated to this chatdb's head. One query
    when it is; the chain is read only to explain why not."""
    with engine.connect() as connection:
        if current_revision(connection) == HEAD_REVISION:
            return
    state = status(engine)
    if not state.known:
        raise unknown_revision(state.current or "")
    if state.current is None:
        raise StateError("the database has no chatdb schema yet", hint="run `chatdb migrate` first")
    if state.pending:
        raise StateError(
            f"the database is at revision {state.current}, behind head {state.head}",
            hint="run `chatdb migrate` first",
        )


# --- changing the database ---------------------------------------------------------------


def _run(engine: Engine, action: str, target: str, lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> None:
    """Run the Alembic command ``action`` ("upgrade", "downgrade", "stamp") to ``target``."""
    from alembic.util import CommandError

    from alembic import command
    from chatdb import migration_ops

    with engine.connect() as connection:
        privileges.require_migrate(connection, (*_OWNED, VERSION_TABLE))
        connection.rollback()
        try:
            getattr(command, action)(_config(connection, lock_timeout=lock_timeout), target)
        except CommandError as exc:
            raise StateError(f"migration failed: {exc}") from None
        except DBAPIError as exc:
            busy = getattr(exc.orig, "sqlstate", None) == "55P03"  # lock_not_available
            raise StateError(
                f"migration failed: {one_line(exc)}",
                hint=migration_ops.busy_hint(lock_timeout) if busy else None,
            ) from None


def upgrade(
    engine: Engine,
    target: str = "head",
    *,
    lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
    reference_users: bool = False,
) -> MigrateResult:
    """Upgrade to ``target``; a no-op when the database is already there. On Citus, at
    head, the tables are then distributed (chatdb.citus); ``reference_users`` lets chatdb
    make the application's ``users`` a reference table."""
    from chatdb import citus

    started = time.perf_counter()
    cluster = citus.require_users(engine, reference_users=reference_users)
    before = status(engine)
    if not before.known:
        raise unknown_revision(before.current or "")
    if before.current is None:
        with engine.connect() as connection:
            existing = sorted(catalog.table_names(connection) & set(_OWNED))
        if existing:
            raise StateError(
                f"chatdb's tables already exist ({', '.join(existing)}) but carry no chatdb "
                "revision (created by an earlier application release?)",
                hint="adopt them with `chatdb migrate stamp REV` once it shows they match REV",
            )
    goal = resolve(target, before.current)
    if _position(goal) < _position(before.current):
        raise UsageError(
            f"{goal or BASE} is below the current revision {before.current}; "
            f"use `chatdb migrate down {target}`"
        )
    if goal != before.current:
        _run(engine, "upgrade", goal or BASE, lock_timeout)
    after = status(engine)
    applied = [r.id for r in chain()[_position(before.current) : _position(after.current)]]
    distributed = []
    if cluster is not None and after.current == HEAD_REVISION:
        distributed = citus.distribute(engine, lock_timeout=lock_timeout)
    return MigrateResult(before.current, after.current, applied, time.perf_counter() - started, distributed)


def plan_downgrade(engine: Engine, target: str, *, lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> DowngradePlan:
    """What ``downgrade(target)`` would do: revisions undone, tables dropped with their row
    counts, columns dropped with the number of values they hold."""
    state = status(engine)
    if not state.known:
        raise unknown_revision(state.current or "")
    if state.current is None:
        raise StateError("the database has no chatdb schema to downgrade")
    goal = resolve(target, state.current)
    if _position(goal) > _position(state.current):
        raise UsageError(
            f"{goal} is above the current revision {state.current}; use `chatdb migrate --to {goal}`"
        )
    undone = [r.id for r in chain()[_position(goal) : _position(state.current)]]
    plan = DowngradePlan(state.current, goal, list(reversed(undone)))
    if not undone:
        return plan
    with engine.connect() as connection:
        # The role that would run the downgrade: say which privilege it lacks, before
        # building the target revision for comparison needs one.
        privileges.require_migrate(connection, (*_OWNED, VERSION_TABLE))
        target_tables = schema_at(connection, goal)
        # The counts below wait for a busy table no longer than a migration would.
        connection.execute(text("SELECT set_config('lock_timeout', :t, true)"), {"t": lock_timeout})
        try:
            _refuse_downgrade(connection, plan.revisions)
            live = catalog.snapshot(connection, (*_OWNED, "users"))
            _count_losses(connection, plan, live, target_tables)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            from chatdb import migration_ops

            raise StateError(
                f"cannot plan the downgrade: {one_line(exc)}", hint=migration_ops.busy_hint(lock_timeout)
            ) from None
        connection.rollback()
    return plan


def _refuse_downgrade(connection: Connection, revisions: list[str]) -> None:
    """Refuse, before any revision is undone, a downgrade that one of them would refuse
    midway (its ``DOWNGRADE_REFUSAL`` query returns why), with those after it already
    undone."""
    for revision, query in _refusals(revisions):
        reason = connection.execute(text(query)).scalar()
        if reason:
            raise StateError(f"cannot downgrade below {revision}: {reason}", hint="nothing was changed")


def _refusals(revisions: list[str]) -> list[tuple[str, str]]:
    """(revision, its DOWNGRADE_REFUSAL query) of the revisions that have one, in order."""
    script = _script()
    found = ((r, getattr(script.get_revision(r).module, "DOWNGRADE_REFUSAL", None)) for r in revisions)
    return [(revision, query) for revision, query in found if query]


def _count_losses(
    connection: Connection, plan: DowngradePlan, live: catalog.Snapshot, target_tables: catalog.Snapshot
) -> None:
    for name, table in live.tables.items():
        if name == "users" and table.comment != USERS_CREATED_BY_CHATDB:
            continue  # the application's table: never dropped
        if name not in target_tables.tables:
            plan.tables.append(TableDrop(name, _count(connection, name)))
            continue
        kept = {column[0] for column in target_tables.tables[name].columns}
        for column in table.columns:
            if column[0] not in kept:
                plan.columns.append(ColumnDrop(name, column[0], _count(connection, name, column[0])))


def downgrade(engine: Engine, target: str, *, lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> MigrateResult:
    started = time.perf_counter()
    plan = plan_downgrade(engine, target, lock_timeout=lock_timeout)
    if plan.revisions:
        _run(engine, "downgrade", plan.target or BASE, lock_timeout)
    after = status(engine)
    return MigrateResult(plan.current, after.current, plan.revisions, time.perf_counter() - started)


@dataclass(frozen=True)
class StampResult:
    previous: str | None
    current: str | None
    compared_tables: list[str]


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


class SchemaMismatch(StateError):
    """``stamp`` refused: the live schema is not what the revision builds."""

    def __init__(self, revision: str, differences: list[SchemaDifference]) -> None:
        self.revision = revision
        self.differences = differences
        detail = str(differences[0]) if len(differences) == 1 else f"{len(differences)} differences"
        super().__init__(
            f"the live schema does not match revision {revision}: {detail}",
            hint="stamp the revision the tables really match, or migrate instead",
        )


def stamp(engine: Engine, target: str) -> StampResult:
    """Record ``target`` as the database's revision without running migrations, after
    proving that the live tables are exactly what the chain builds at ``target``."""
    with engine.connect() as connection:
        previous = current_revision(connection)
        if previous is not None and previous not in [r.id for r in chain()]:
            raise unknown_revision(previous)
        goal = resolve(target, previous)
        privileges.require_migrate(connection, (*_OWNED, VERSION_TABLE))
        expected = schema_at(connection, goal)
        # users is the application's table when adopting; its own columns are its business.
        names = sorted((set(expected.tables) | set(_OWNED)) - {"users"})
        expected_owned = catalog.Snapshot({n: t for n, t in expected.tables.items() if n in names})
        live = catalog.snapshot(connection, names)
        problems = schema_differences(expected_owned, live)
        if goal is not None and "users" not in catalog.table_names(connection):
            # The foreign keys need it; its columns are the application's business.
            problems.insert(0, SchemaDifference("users", "table", "users", "exists", None))
        connection.rollback()
    if problems:
        raise SchemaMismatch(goal or BASE, problems)
    _run(engine, "stamp", goal or BASE)
    return StampResult(previous, goal, sorted(live.tables))


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


def schema_at(connection: Connection, revision: str | None) -> catalog.Snapshot:
    """The schema the chain builds at ``revision``, built in a scratch schema inside a
    transaction that is rolled back: nothing is left behind and no live table is locked."""
    if revision is None:
        return catalog.Snapshot()
    from alembic import command

    scratch = f"chatdb_scratch_{secrets.token_hex(6)}"
    if connection.in_transaction():
        connection.rollback()
    transaction = connection.begin()
    try:
        connection.execute(text(f'CREATE SCHEMA "{scratch}"'))
        connection.execute(text("SELECT set_config('search_path', :path, true)"), {"path": scratch})
        command.upgrade(_config(connection, concurrently=False), revision)
        names = catalog.table_names(connection, scratch) - {VERSION_TABLE}
        return catalog.snapshot(connection, names, scratch)
    except DBAPIError as exc:
        raise StateError(f"could not build revision {revision} for comparison: {one_line(exc)}") from None
    finally:
        transaction.rollback()


def offline_sql(start: str | None = None, end: str = "head") -> str:
    """The SQL a DBA reviews: applied with ``psql -f`` to a database at ``start`` it gives
    the same schema as ``chatdb migrate --to end``. Downgrade SQL when ``end`` is below."""
    from alembic import command

    first = resolve(start) if start else None
    last = resolve(end, first)
    buffer = io.StringIO()
    config = _config(output_buffer=buffer)
    if _position(last) >= _position(first):
        span = f"{first}:{last or BASE}" if first else (last or BASE)
        command.upgrade(config, span, sql=True)
    else:
        from chatdb import migration_ops

        # Each revision refuses by itself before it changes anything; the refusals of
        # the whole range come first too, so that none is met after others were undone.
        undone = [r.id for r in reversed(chain()[_position(last) : _position(first)])]
        for revision, query in _refusals(undone):
            buffer.write(f"{migration_ops.refusal(revision, query)};\n\n")
        command.downgrade(config, f"{first}:{last or BASE}", sql=True)
    return buffer.getvalue()


# --- helpers ------------------------------------------------------------------------------


def _count(connection: Connection, table: str, column: str | None = None) -> int:
    quote = connection.dialect.identifier_preparer.quote
    what = f"count({quote(column)})" if column else "count(*)"
    return int(connection.execute(text(f"SELECT {what} FROM {quote(table)}")).scalar_one())
