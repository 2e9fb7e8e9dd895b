"""Operations the migration scripts share.

Revisions that touch tables which may already hold data build indexes
``CONCURRENTLY`` and validate constraints in their own short transactions. Those steps
commit as they go, so each is idempotent: a revision interrupted half-way is simply run
again.

When chatdb builds a revision's schema in a scratch schema inside a transaction that is
rolled back (``migrate stamp``, ``migrate down``), concurrent builds are impossible and
unnecessary; the migration context option ``chatdb_concurrently=False`` turns them into
plain statements.

Timeouts: every transaction of a migration has a local ``lock_timeout`` and
``statement_timeout`` (alembic/env.py). A statement outside a transaction cannot have
local ones: online it is watched for lock waits (:func:`lock_wait_limit`); in the offline
SQL, which psql runs in a session of its own, it runs with ``statement_timeout = 0``
(it may take long, and blocks no one) under the script's session ``lock_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from alembic import op
from chatdb.errors import StateError

#: How often the watchdog of a statement outside a transaction looks at its lock wait.
_WATCH_INTERVAL = 0.05


def _concurrently() -> bool:
    return bool(op.get_context().opts.get("chatdb_concurrently", True))


def refusal(revision: str, query: str) -> str:
    """A statement that stops a downgrade below ``revision`` with the reason ``query``
    returns (when it returns no row, nothing happens). The revision runs it before it
    changes anything; ``chatdb migrate down`` and ``chatdb migrate sql`` ask it before
    any revision of their range is undone."""
    return (
        f"DO $$ DECLARE reason text := ({query}); BEGIN IF reason IS NOT NULL THEN"
        f" RAISE EXCEPTION USING MESSAGE = 'cannot downgrade below {revision}: ' || reason;"
        " END IF; END $$"
    )


def refuse_downgrade(revision: str, query: str) -> None:
    """Run the refusal of ``revision`` (see :func:`refusal`) in the migration's
    transaction. Its query may read a whole table, holding only the ACCESS SHARE lock
    that blocks none of the application's statements, so the transaction's
    statement_timeout does not apply to it."""
    timeout = op.get_context().opts.get("chatdb_statement_timeout")
    op.execute("SET LOCAL statement_timeout = 0")
    op.execute(refusal(revision, query))
    if timeout:
        op.execute(f"SET LOCAL statement_timeout = '{timeout}'")


def create_index(
    name: str, table: str, columns: str, *, unique: bool = False, where: str | None = None
) -> None:
    """Create an index, CONCURRENTLY unless in a scratch build. An index left invalid by
    an earlier failed concurrent build is dropped and built again."""
    kind = "UNIQUE INDEX" if unique else "INDEX"
    predicate = f" WHERE {where}" if where else ""
    if not _concurrently():
        op.execute(f"CREATE {kind} {name} ON {table} {columns}{predicate}")
        return
    context = op.get_context()
    with context.autocommit_block():
        if context.as_sql:
            # psql runs this script again after a failure: an index that an interrupted
            # build left invalid is dropped (an instant catalog change, under the
            # script's lock_timeout); a valid one is kept by IF NOT EXISTS.
            op.execute(
                "DO $$ BEGIN IF (SELECT NOT indisvalid FROM pg_index"
                f" WHERE indexrelid = to_regclass('{name}')) THEN DROP INDEX {name}; END IF; END $$"
            )
        else:
            valid = (
                op.get_bind()
                .execute(
                    text(
                        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                        " WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace"
                    ),
                    {"name": name},
                )
                .scalar()
            )
            if valid:
                return
            if valid is not None:
                _outside_transaction(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        _outside_transaction(
            f"CREATE {kind} CONCURRENTLY IF NOT EXISTS {name} ON {table} {columns}{predicate}"
        )


def drop_index(name: str) -> None:
    """Drop an index if it exists, CONCURRENTLY unless in a scratch build."""
    if not _concurrently():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        return
    with op.get_context().autocommit_block():
        _outside_transaction(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def validate_constraint(table: str, name: str) -> None:
    """Validate a constraint added NOT VALID, in its own transaction, so the scan holds
    only a SHARE UPDATE EXCLUSIVE lock (writes go on) and the ALTER that added it did not
    hold its stronger lock for the length of the scan."""
    statement = f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}"
    if not _concurrently():
        op.execute(statement)
        return
    with op.get_context().autocommit_block():
        _outside_transaction(statement)


def _outside_transaction(statement: str) -> None:
    """Run a statement that cannot be in a transaction, so its lock_timeout cannot be SET
    LOCAL, and a session SET would outlive it on a transaction pooler's server connection
    (and reach the application's queries). A watchdog on a second connection cancels it
    instead once it has waited for a lock longer than the migration's lock_timeout."""
    context = op.get_context()
    if context.as_sql:
        op.execute("SET statement_timeout = 0")
        op.execute(statement)
        op.execute(f"SET statement_timeout = '{context.opts['chatdb_statement_timeout']}'")
        return
    lock_timeout = context.opts.get("chatdb_lock_timeout")
    if not lock_timeout:
        op.execute(statement)
        return
    with lock_wait_limit(op.get_bind().engine, statement, lock_timeout):
        op.execute(statement)


@contextmanager
def lock_wait_limit(engine: Engine, statement: str, lock_timeout: str) -> Iterator[None]:
    """Cancel ``statement`` (run by this role in this database while the block runs) once
    one of its lock waits has lasted ``lock_timeout``, as lock_timeout itself would. It
    needs no session state, so it works through a transaction pooler, where the backend
    that will run the statement is not known in advance. The cancellation re-checks, in
    the same statement, that the backend still waits in that very statement."""
    stop, cancelled = threading.Event(), threading.Event()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        limit = float(
            watcher.execute(
                text("SELECT extract(epoch FROM CAST(:timeout AS interval))"), {"timeout": lock_timeout}
            ).scalar_one()
        )

        def watch() -> None:
            waiting: dict[tuple, float] = {}
            try:
                while not stop.wait(_WATCH_INTERVAL):
                    rows = watcher.execute(_WAITING, {"statement": statement}).all()
                    now = time.monotonic()
                    waiting = {tuple(row): waiting.get(tuple(row), now) for row in rows}
                    for (pid, started), since in waiting.items():
                        if now - since >= limit:
                            cancelled.set()
                            watcher.execute(_CANCEL, {"pid": pid, "started": started, "statement": statement})
            except DBAPIError:
                pass  # the watcher's connection is gone; the statement runs on, unwatched

        thread = threading.Thread(target=watch, name="chatdb lock_timeout", daemon=True)
        thread.start()
        try:
            yield
        except DBAPIError as exc:
            if cancelled.is_set() and getattr(exc.orig, "sqlstate", None) == "57014":  # query_canceled
                raise StateError(
                    f"migration failed: {statement} waited longer than {lock_timeout} for a lock",
                    hint=busy_hint(lock_timeout),
                ) from None
            raise
        finally:
            stop.set()
            thread.join()


#: See :func:`lock_tables`. ``TABLES`` stands for the tables, as a SQL array of names.
#: (No ``%`` in it: a driver's placeholder, and offline SQL would keep it doubled.)
_LOCK_TABLES = """DO $$
DECLARE
    tables text[] := TABLES;
    kept text := current_setting('lock_timeout');
    deadline timestamptz := CASE WHEN CAST(current_setting('lock_timeout') AS interval) > interval '0'
        THEN clock_timestamp() + CAST(current_setting('lock_timeout') AS interval) END;
    waited int := 1;
    tried int;
BEGIN
    LOOP
        BEGIN
            tried := waited;
            IF deadline IS NOT NULL THEN
                PERFORM set_config('lock_timeout', ceil(1000 * greatest(0.001,
                    extract(epoch FROM deadline - clock_timestamp()))) || 'ms', true);
            END IF;
            EXECUTE 'LOCK TABLE ' || quote_ident(tables[waited]) || ' IN ACCESS EXCLUSIVE MODE';
            FOR i IN 1 .. cardinality(tables) LOOP
                CONTINUE WHEN i = waited;
                tried := i;
                EXECUTE 'LOCK TABLE ' || quote_ident(tables[i]) || ' IN ACCESS EXCLUSIVE MODE NOWAIT';
            END LOOP;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF deadline IS NULL OR clock_timestamp() >= deadline THEN
                RAISE;
            END IF;
            waited := tried;
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', kept, true);
END $$"""


def lock_tables(*tables: str) -> None:
    """Take ACCESS EXCLUSIVE locks on ``tables`` at the start of a transaction that
    changes them all, so that the application never waits for one of them while the
    migration waits for another.

    A statement that locks a second table while it holds the first (an ``ALTER`` after
    an ``ALTER``, or one ``LOCK`` of several tables) keeps the application off the first
    for as long as it waits for the second: one ``lock_timeout`` each. Here the migration
    waits for one table only while it holds none: it waits for one, then takes the
    others with ``NOWAIT``; when one of those is busy, it lets go of all of them (the
    attempt is a subtransaction) and waits for that one instead. All of it within one
    ``lock_timeout``, which ends it with the same error (55P03) as a single wait."""
    names = ", ".join(f"'{table}'" for table in tables)
    op.execute(_LOCK_TABLES.replace("TABLES", f"ARRAY[{names}]"))


def busy_hint(lock_timeout: str) -> str:
    return (
        f"another session held a lock on the table for longer than {lock_timeout}; "
        "run the migration again when the table is less busy"
    )


_WAITING = text(
    "SELECT pid, query_start FROM pg_stat_activity"
    " WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid()"
    " AND state = 'active' AND wait_event_type = 'Lock' AND query = :statement"
)
_CANCEL = text(
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
    " WHERE pid = :pid AND query_start = :started AND wait_event_type = 'Lock' AND query = :statement"
)


def replace_primary_key(
    table: str,
    columns: tuple[str, ...],
    *,
    dependents: tuple[tuple[str, str, str], ...] = (),
    drop_unique: str | None = None,
    add_unique: tuple[str, tuple[str, ...]] | None = None,
) -> None:
    """Give ``table`` the primary key ``columns`` (the constraint keeps its name) with a
    short lock. The new unique indexes are built CONCURRENTLY first; then one transaction
    locks ``table`` and the dependents' tables (:func:`lock_tables`), drops the foreign
    keys ``dependents`` (table, constraint, definition) that hang on the old key or on
    ``drop_unique``, drops those, adds the new key (and ``add_unique``, a unique
    constraint (name, columns)) USING the new indexes, which needs no scan since the
    columns are NOT NULL, and puts the foreign keys back NOT VALID. Each foreign key is
    then validated in a statement of its own, which blocks no writes.

    Idempotent: a key that already has ``columns`` is left as it is, and an index left by
    a run interrupted after the swap is dropped."""
    key = f"{table}_pkey"
    new = f"{key}_new"
    indexes = [(new, columns)] + ([add_unique] if add_unique else [])
    # Each subcommand in an ALTER TABLE of its own: Citus refuses several in one.
    before = [f"ALTER TABLE {child} DROP CONSTRAINT IF EXISTS {name}" for child, name, _ in dependents]
    if drop_unique:
        before.append(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {drop_unique}")
    swap = [
        f"ALTER TABLE {table} DROP CONSTRAINT {key}",
        f"ALTER TABLE {table} ADD CONSTRAINT {key} PRIMARY KEY USING INDEX {new}",
    ]
    if add_unique:
        swap.append(f"ALTER TABLE {table} ADD CONSTRAINT {add_unique[0]} UNIQUE USING INDEX {add_unique[0]}")
    after = [
        f"ALTER TABLE {child} ADD CONSTRAINT {name} {definition} NOT VALID"
        for child, name, definition in dependents
    ]
    wanted = "'{" + ",".join(columns) + "}'::name[]"
    tables = dict.fromkeys((table, *(child for child, _, _ in dependents)))
    context = op.get_context()
    if context.as_sql or not _concurrently():
        # psql may run the script again after an interruption: the swap is guarded by the
        # key's columns (the foreign keys are dropped and added again either way), and an
        # index that a second run built after the swap is dropped.
        for name, index_columns in indexes:
            create_index(name, table, f"({', '.join(index_columns)})", unique=True)
        lock_tables(*tables)
        for statement in before:
            op.execute(statement)
        op.execute(
            f"DO $$ BEGIN IF {_key_columns(key)} IS DISTINCT FROM {wanted}"
            f" THEN {'; '.join(swap)}; END IF; END $$"
        )
        for statement in after:
            op.execute(statement)
    elif not op.get_bind().execute(text(f"SELECT {_key_columns(key)} = {wanted}")).scalar():
        for name, index_columns in indexes:
            create_index(name, table, f"({', '.join(index_columns)})", unique=True)
        lock_tables(*tables)
        for statement in (*before, *swap, *after):
            op.execute(statement)
    drop_index(new)
    for child, name, _ in dependents:
        validate_constraint(child, name)


def _key_columns(key: str) -> str:
    """SQL: the key columns of the index ``key``, in order (NULL when there is none)."""
    return (
        "(SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i"
        " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        f" WHERE i.indexrelid = to_regclass('{key}'))"
    )
