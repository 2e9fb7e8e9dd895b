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
from typing import TYPE_CHECKING, Any

import psycopg.errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from chatdb import catalog, privileges, revisions
from chatdb.errors import StateError, UsageError, one_line
from chatdb.revisions import BASE, Revision, script_location
from chatdb.schema import CHATDB_TABLES, HEAD_REVISION, USERS_CREATED_BY_CHATDB, VERSION_TABLE
from chatdb.schema_diff import SchemaDifference, schema_differences

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported by the functions that run or read the chain, not at import time:
# the commands that only need to know the database is at head (seed, archive, purge,
# status) start without it, and read no script (chatdb.revisions).

__all__ = [
    "BASE",
    "DEFAULT_LOCK_TIMEOUT",
    "ColumnDrop",
    "DowngradePlan",
    "MigrateResult",
    "MigrationStatus",
    "Revision",
    "SchemaDifference",
    "SchemaMismatch",
    "StampResult",
    "TableDrop",
    "chain",
    "current_revision",
    "downgrade",
    "head",
    "offline_sql",
    "plan_downgrade",
    "require_head",
    "resolve",
    "schema_at",
    "schema_differences",
    "script_location",
    "stamp",
    "status",
    "unknown_revision",
    "upgrade",
]

#: How long a migration waits for a table lock before failing (instead of queueing the
#: application's queries behind its lock request).
DEFAULT_LOCK_TIMEOUT = "5s"
_OWNED = tuple(table.name for table in CHATDB_TABLES)


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    head: str
    pending: list[Revision]
    known: bool  # False when the database is at a revision this chatdb does not know
    #: With no revision recorded: chatdb's tables that exist all the same (made by an
    #: earlier release, or by `migrate sql` without its version table), for `stamp`.
    unstamped: tuple[str, ...] = ()

    @property
    def up_to_date(self) -> bool:
        return self.known and not self.pending

    def as_dict(self) -> dict[str, Any]:
        """The shape of ``--json``'s revision (``migrate status``, ``status``)."""
        return {
            "current": self.current,
            "head": self.head,
            "pending": [revision.id for revision in self.pending],
            "known": self.known,
            "up_to_date": self.up_to_date,
            "unstamped": list(self.unstamped),
        }


@dataclass(frozen=True)
class MigrateResult:
    previous: str | None
    current: str | None
    applied: list[str]
    elapsed: float
    #: On Citus: the tables this run distributed (chatdb.citus.distribute).
    distributed: list[str] = field(default_factory=list)
    #: On Citus: the coordinator's tables this run added to Citus's metadata, as Citus
    #: local tables (chatdb.citus.distribute).
    citus_local: list[str] = field(default_factory=list)


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


def _config(
    connection: Connection | None = None, *, output_buffer: io.StringIO | None = None, **attributes: object
) -> Config:
    attributes.setdefault("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    if connection is not None:
        attributes["connection"] = connection
    return revisions.config(output_buffer, **attributes)


def chain() -> list[Revision]:
    """Every revision, oldest first."""
    return list(revisions.load().revisions)


def head() -> str:
    return revisions.load().head


def resolve(spec: str, current: str | None = None) -> str | None:
    """An absolute revision id (None for base) from an id, a unique prefix, ``head``,
    ``base`` or ``-N``/``+N`` relative to ``current``."""
    return revisions.load().resolve(spec, current)


# --- reading the database ----------------------------------------------------------------


_READ_VERSION = text(f'SELECT version_num FROM "{VERSION_TABLE}" LIMIT 1')


def current_revision(connection: Connection) -> str | None:
    """The revision in the version table (None when there is none). The chain is linear,
    so the table holds one row at most. Changes nothing in the connection's transaction."""
    if connection.execute(text("SELECT to_regclass(:table)"), {"table": VERSION_TABLE}).scalar() is None:
        return None
    return connection.execute(_READ_VERSION).scalar()


def _recorded_revision(engine: Engine) -> str | None:
    """``current_revision`` in one statement, on a connection of its own: the version
    table is there in every database chatdb migrated, and a database without it is told
    by the error's SQLSTATE."""
    with engine.connect() as connection:
        try:
            return connection.execute(_READ_VERSION).scalar()
        except DBAPIError as exc:
            if not isinstance(exc.orig, psycopg.errors.UndefinedTable):
                raise
            return None


def status(engine: Engine) -> MigrationStatus:
    """Where the database is in the chain. At head, one query and no script read."""
    current = _recorded_revision(engine)
    if current == HEAD_REVISION:
        return MigrationStatus(current, HEAD_REVISION, [], known=True)
    scripts = revisions.load()
    if current is not None and current not in scripts.ids:
        return MigrationStatus(current, scripts.head, [], known=False)
    unstamped: tuple[str, ...] = ()
    if current is None:
        with engine.connect() as connection:
            unstamped = tuple(sorted(catalog.table_names(connection) & set(_OWNED)))
    return MigrationStatus(
        current, scripts.head, scripts.between(current, scripts.head), known=True, unstamped=unstamped
    )


def unknown_revision(current: str) -> StateError:
    return StateError(
        f"the database is at revision {current!r}, which this chatdb does not know "
        "(was it migrated by a newer chatdb?)",
        hint="upgrade chatdb, or check that --database-url points at the right database",
    )


def require_head(engine: Engine) -> None:
    """Raise StateError unless the database is migrated to this chatdb's head. One query
    when it is; the chain is read only to explain why not."""
    state = status(engine)
    if state.up_to_date:
        return
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

    from chatdb import migration_ops

    with engine.connect() as connection:
        privileges.require_migrate(connection, (*_OWNED, VERSION_TABLE))
        connection.rollback()
        try:
            revisions.load().run(_config(connection, lock_timeout=lock_timeout), action, target)
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
    cluster = citus.preflight(engine, reference_users=reference_users)
    before = status(engine)
    if target == "head" and before.current == HEAD_REVISION and cluster is None:
        # Nothing to do, no script to read (on Citus, the distribution is checked below).
        return MigrateResult(before.current, before.current, [], time.perf_counter() - started)
    if not before.known:
        raise unknown_revision(before.current or "")
    if before.unstamped:
        raise StateError(
            f"chatdb's tables already exist ({', '.join(before.unstamped)}) but carry no chatdb "
            "revision (created by an earlier application release?)",
            hint="adopt them with `chatdb migrate stamp REV` once it shows they match REV",
        )
    scripts = revisions.load()
    goal = scripts.resolve(target, before.current)
    if scripts.position(goal) < scripts.position(before.current):
        raise UsageError(
            f"{goal or BASE} is below the current revision {before.current}; "
            f"use `chatdb migrate down {target}`"
        )
    if goal != before.current:
        _run(engine, "upgrade", goal or BASE, lock_timeout)
    after = status(engine)
    applied = [r.id for r in scripts.between(before.current, after.current)]
    layout = citus.Distribution([], [])
    if cluster is not None and after.current == HEAD_REVISION:
        layout = citus.distribute(engine, lock_timeout=lock_timeout)
    return MigrateResult(
        before.current,
        after.current,
        applied,
        time.perf_counter() - started,
        layout.distributed,
        layout.local,
    )


def plan_downgrade(engine: Engine, target: str, *, lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> DowngradePlan:
    """What ``downgrade(target)`` would do: revisions undone, tables dropped with their row
    counts, columns dropped with the number of values they hold."""
    state = status(engine)
    if not state.known:
        raise unknown_revision(state.current or "")
    if state.current is None:
        raise StateError("the database has no chatdb schema to downgrade")
    scripts = revisions.load()
    goal = scripts.resolve(target, state.current)
    if scripts.position(goal) > scripts.position(state.current):
        raise UsageError(
            f"{goal} is above the current revision {state.current}; use `chatdb migrate --to {goal}`"
        )
    undone = [r.id for r in scripts.between(goal, state.current)]
    plan = DowngradePlan(state.current, goal, list(reversed(undone)))
    if not undone:
        return plan
    from chatdb import citus

    with engine.connect() as connection:
        citus.refuse_below_layout(connection, goal or BASE, "downgrade to", plan.revisions)
        connection.rollback()
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


def _refuse_downgrade(connection: Connection, undone: list[str]) -> None:
    """Refuse, before any revision is undone, a downgrade that one of them would refuse
    midway (its ``DOWNGRADE_REFUSAL`` query returns why), with those after it already
    undone."""
    for revision, query in revisions.load().refusals(undone):
        reason = connection.execute(text(query)).scalar()
        if reason:
            raise StateError(f"cannot downgrade below {revision}: {reason}", hint="nothing was changed")


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

    def details(self) -> dict[str, Any]:
        return {"differences": self.differences}


def stamp(engine: Engine, target: str) -> StampResult:
    """Record ``target`` as the database's revision without running migrations, after
    proving that the live tables are exactly what the chain builds at ``target``."""
    from chatdb import citus

    with engine.connect() as connection:
        previous = current_revision(connection)
        scripts = revisions.load()
        if previous is not None and previous not in scripts.ids:
            raise unknown_revision(previous)
        goal = scripts.resolve(target, previous)
        unapplied = [r.id for r in scripts.between(goal, scripts.head)]
        citus.refuse_below_layout(connection, goal or BASE, "stamp", unapplied)
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


def schema_at(connection: Connection, revision: str | None) -> catalog.Snapshot:
    """The schema the chain builds at ``revision``, built in a scratch schema inside a
    transaction that is rolled back: nothing is left behind and no live table is locked."""
    if revision is None:
        return catalog.Snapshot()
    scratch = f"chatdb_scratch_{secrets.token_hex(6)}"
    if connection.in_transaction():
        connection.rollback()
    transaction = connection.begin()
    try:
        connection.execute(text(f'CREATE SCHEMA "{scratch}"'))
        connection.execute(text("SELECT set_config('search_path', :path, true)"), {"path": scratch})
        revisions.load().run(_config(connection, concurrently=False), "upgrade", revision)
        names = catalog.table_names(connection, scratch) - {VERSION_TABLE}
        return catalog.snapshot(connection, names, scratch)
    except DBAPIError as exc:
        raise StateError(f"could not build revision {revision} for comparison: {one_line(exc)}") from None
    finally:
        transaction.rollback()


def offline_sql(start: str | None = None, end: str = "head") -> str:
    """The SQL a DBA reviews: applied with ``psql -f`` to a database at ``start`` it gives
    the same schema as ``chatdb migrate --to end``. Downgrade SQL when ``end`` is below."""
    scripts = revisions.load()
    first = scripts.resolve(start) if start else None
    last = scripts.resolve(end, first)
    buffer = io.StringIO()
    config = _config(output_buffer=buffer)
    if scripts.position(last) >= scripts.position(first):
        scripts.run(config, "upgrade", last or BASE, sql=True, start=first)
    else:
        from chatdb import migration_ops

        # Each revision refuses by itself before it changes anything; the refusals of
        # the whole range come first too, so that none is met after others were undone.
        undone = [r.id for r in reversed(scripts.between(last, first))]
        for revision, query in scripts.refusals(undone):
            buffer.write(f"{migration_ops.refusal(revision, query)};\n\n")
        scripts.run(config, "downgrade", last or BASE, sql=True, start=first)
    return buffer.getvalue()


# --- helpers ------------------------------------------------------------------------------


def _count(connection: Connection, table: str, column: str | None = None) -> int:
    quote = connection.dialect.identifier_preparer.quote
    what = f"count({quote(column)})" if column else "count(*)"
    return int(connection.execute(text(f"SELECT {what} FROM {quote(table)}")).scalar_one())
