"""The load: one seed, whole, in one transaction, and ``reset``, which takes seeds out.

The rows come from a generator child (``child``, ``rows``) and go in with COPY: users and
conversations as text, messages as binary. Into empty tables the load takes them over
(the fast path): it drops their indexes and constraints, copies, and rebuilds every index
and constraint from ``chatdb.schema``. Tables that already hold rows are loaded with their
constraints in place, taking no lock stronger than an INSERT's.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.schema import ForeignKeyConstraint

from chatdb import citus, migrations, privileges
from chatdb.errors import StateError
from chatdb.schema import add_constraint_sql, conversations, messages, metadata
from chatdb.seed.child import in_child
from chatdb.seed.request import SEEDED, Progress, ResetResult, SeedRequest, SeedResult
from chatdb.seed.request import seeded as seeded_params
from chatdb.seed.rows import CONVERSATION_COLUMNS, MESSAGE_LAYOUT, all_chunks


def seeded_user_count(connection: Connection, seed: int | None = None) -> int:
    """The users of ``seed`` (of every seed: None)."""
    return int(
        connection.execute(
            text(f"SELECT count(*) FROM users WHERE {SEEDED.format('id')}"), seeded_params(seed)
        ).scalar_one()
    )


def seed(engine: Engine, request: SeedRequest, progress: Progress | None = None) -> SeedResult:
    """Load one seed, whole, in one transaction."""
    request.validate()
    migrations.require_head(engine)
    started = time.perf_counter()
    report = progress or (lambda phase, done, total: None)
    with engine.connect() as connection, connection.begin():
        # On Citus, users (a reference table) is written after the distributed tables
        # were read and changed in this transaction.
        citus.sequential(connection)
        privileges.require_table_privileges(
            connection,
            [(p, t) for t in ("users", "conversations", "messages") for p in ("SELECT", "INSERT")],
            "seed writes users, conversations and messages",
        )
        if seeded_user_count(connection, request.seed):
            raise StateError(
                f"seed {request.seed} is already loaded (users {request.user_prefix}*)",
                hint="pass --reset to delete every earlier seed's users (seed-*) and load it again,"
                " or another --seed to add different data",
            )
        anchor = connection.execute(text("SELECT now()")).scalar_one().astimezone(dt.UTC)
        user_columns = _user_columns(connection)
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        connection.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        fast = _take_over_if_empty(connection)
        _load(connection, request, anchor, user_columns, report)
        if fast:
            report("indexes", 0, 1)
            _rebuild(connection)
            report("indexes", 1, 1)
    return SeedResult.of(request, anchor, fast, time.perf_counter() - started)


def _user_columns(connection: Connection) -> list[tuple[str, str]]:
    """The users columns the seed fills: chatdb's own, and the application's usual ones.
    A NOT NULL column without a default that the seed cannot fill is refused up front."""
    rows = connection.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
            " a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''"
            " FROM pg_attribute a WHERE a.attrelid = to_regclass('users')"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        )
    ).all()
    fillable = {
        "id": "id",
        "email": "email",
        "name": "name",
        "created_at": "time",
        "createdAt": "time",
        "updated_at": "time",
        "updatedAt": "time",
        "email_verified": "false",
        "emailVerified": "false",
    }
    chosen, missing = [], []
    for name, type_name, not_null, has_default in rows:
        if name in fillable and not (fillable[name] == "false" and type_name != "boolean"):
            chosen.append((name, fillable[name]))
        elif not_null and not has_default:
            missing.append(f"{name} ({type_name})")
    if missing:
        raise StateError("the users table has required columns the seed cannot fill: " + ", ".join(missing))
    return chosen


def _take_over_if_empty(connection: Connection) -> bool:
    """When the hot tables are empty, lock them and drop their indexes and constraints for
    the load (``_rebuild`` puts them back before commit). Returns whether it did.

    Tables that hold rows are never locked beyond what INSERT takes. The take-over runs
    in a savepoint: if the tables turn out not to be empty once locked, or something
    else depends on their keys, rolling back to it releases the lock and restores them.
    """
    empty = text("SELECT NOT EXISTS (SELECT 1 FROM conversations) AND NOT EXISTS (SELECT 1 FROM messages)")
    if not connection.execute(empty).scalar_one():
        return False
    if privileges.not_owned(connection, ("conversations", "messages")):
        return False  # dropping constraints and indexes is for the tables' owner
    savepoint = connection.begin_nested()
    try:
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        connection.execute(text("LOCK TABLE conversations, messages IN ACCESS EXCLUSIVE MODE"))
        if not connection.execute(empty).scalar_one():
            savepoint.rollback()
            return False
        quote = connection.dialect.identifier_preparer.quote
        for table in (messages, conversations):
            for constraint in _droppable(table):
                assert constraint.name is not None  # schema.py names every constraint
                connection.execute(
                    text(
                        f"ALTER TABLE {quote(table.name)} DROP CONSTRAINT IF EXISTS {quote(constraint.name)}"
                    )
                )
            for index in table.indexes:
                assert index.name is not None  # schema.py names every index
                connection.execute(text(f"DROP INDEX IF EXISTS {quote(index.name)}"))
    except DBAPIError:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def _droppable(table):
    """Foreign keys first, then the keys they reference."""
    keys = [c for c in table.constraints if isinstance(c, ForeignKeyConstraint)]
    return keys + [
        c for c in table.constraints if c.__visit_name__ in ("primary_key_constraint", "unique_constraint")
    ]


def _rebuild(connection: Connection) -> None:
    """Recreate, from chatdb.schema, what ``_take_over_if_empty`` dropped."""

    def add(constraint) -> None:
        connection.execute(text(add_constraint_sql(constraint)))

    for table in (conversations, messages):
        for constraint in reversed(_droppable(table)):
            if not isinstance(constraint, ForeignKeyConstraint):
                add(constraint)
        for index in table.indexes:
            connection.execute(CreateIndex(index))
    for table in (conversations, messages):
        for constraint in _droppable(table):
            if isinstance(constraint, ForeignKeyConstraint):
                add(constraint)


def _copy(
    connection: Connection,
    table: str,
    columns: Sequence[str],
    chunks: Iterator[bytes],
    *,
    binary: bool = False,
) -> None:
    raw = connection.connection.driver_connection
    assert raw is not None  # a connection in use has its driver's
    quoted = ", ".join(f'"{c}"' for c in columns)
    options = " (FORMAT binary)" if binary else ""
    with raw.cursor() as cursor, cursor.copy(f'COPY "{table}" ({quoted}) FROM STDIN{options}') as copy:
        for chunk in chunks:
            copy.write(chunk)


def _load(
    connection: Connection,
    request: SeedRequest,
    anchor: dt.datetime,
    user_columns: list[tuple[str, str]],
    report: Progress,
) -> None:
    """COPY users, conversations and messages, generated by a child process."""
    frames = in_child(all_chunks(request, anchor, user_columns))
    offsets = (0, request.users, request.users + request.conversations)
    for (table, columns), offset in zip(
        (
            ("users", [name for name, _ in user_columns]),
            ("conversations", CONVERSATION_COLUMNS),
            ("messages", MESSAGE_LAYOUT.columns),
        ),
        offsets,
        strict=True,
    ):

        def rows(table: str = table, offset: int = offset) -> Iterator[bytes]:
            for chunk, done in frames:
                if not chunk:  # the end of this table
                    return
                yield chunk
                report(table, offset + done, request.rows)

        # Messages travel in COPY's binary format: ids and timestamps are packed, not
        # formatted as text by Python and parsed again by the server.
        _copy(connection, table, columns, rows(), binary=table == "messages")
    for _ in frames:  # reach the end of the stream, and the child's exit status
        raise RuntimeError("the generator produced more tables than expected")


#: The tables a seed fills besides users, children first (the order TRUNCATE names them).
_CHAT_TABLES = ["messages_archive", "conversations_archive", "messages", "conversations"]
#: The foreign keys chatdb declares on them (``schema.py``); any other is the application's.
_OWN_FOREIGN_KEYS = sorted(
    str(key.name) for name in _CHAT_TABLES for key in metadata.tables[name].foreign_key_constraints
)


def reset(engine: Engine) -> ResetResult:
    """Delete every seeded user (``SEEDED_ID``) and, by cascade, everything of theirs.
    Never touches a row of any other user: a cascade that an application's own foreign
    key carries on to another user's row rolls the whole reset back."""
    migrations.require_head(engine)
    params = seeded_params()
    with engine.connect() as connection, connection.begin():
        citus.sequential(connection)  # as in seed(): users is written last
        privileges.require_table_privileges(
            connection,
            [("SELECT", "users"), ("DELETE", "users")],
            "seed --reset deletes the seeded users, and everything of theirs by cascade",
        )
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        # Foreign keys of the application's own to chatdb's tables: a cascade can carry on
        # through them to rows of other users, and TRUNCATE refuses to run.
        referenced = connection.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f'"
                " AND confrelid = ANY(CAST(:tables AS regclass[])) AND NOT conname = ANY(:own))"
            ),
            {"tables": _CHAT_TABLES, "own": _OWN_FOREIGN_KEYS},
        ).scalar_one()
        truncatable = (
            not referenced
            and connection.execute(
                text(
                    "SELECT bool_and(has_table_privilege(to_regclass(t), 'TRUNCATE'))"
                    " FROM unnest(CAST(:tables AS text[])) AS t"
                ),
                {"tables": _CHAT_TABLES},
            ).scalar_one()
        )
        if truncatable:
            # No conversation can be added while this transaction decides: the check
            # below sees every conversation committed before the truncate.
            connection.execute(
                text("LOCK TABLE conversations, conversations_archive IN SHARE ROW EXCLUSIVE MODE")
            )
        counts = _seeded_counts(connection)
        if truncatable and counts.conversations and not _others_exist(connection):
            # The seed owns every conversation, hot and archived: truncating is exact and
            # far faster than cascading row by row.
            connection.execute(text(f"TRUNCATE {', '.join(_CHAT_TABLES)}"))
        # Counted only when a key of the application's could carry the cascade on.
        others = _others(connection) if referenced else None
        connection.execute(text(f"DELETE FROM users WHERE {SEEDED.format('id')}"), params)
        if others is not None and _others(connection) != others:
            raise StateError(
                "seed --reset would also delete rows of users that seed did not create, through "
                "a foreign key of the application's; it rolled back and deleted nothing",
                hint="delete the seeded users yourself, once the application's rows no longer reference them",
            )
    return counts


def _others_exist(connection: Connection) -> bool:
    """Whether a conversation, hot or archived, is of a user that seed did not create
    (their messages need their conversation)."""
    others = f"NOT {SEEDED.format('user_id')}"
    return bool(
        connection.execute(
            text(
                f"SELECT EXISTS (SELECT 1 FROM conversations WHERE {others})"
                f" OR EXISTS (SELECT 1 FROM conversations_archive WHERE {others})"
            ),
            seeded_params(),
        ).scalar_one()
    )


def _others(connection: Connection) -> tuple[int, ...]:
    """The rows of users that seed did not create, in each chat table."""
    others = f"NOT {SEEDED.format('user_id')}"
    counts = ", ".join(f"(SELECT count(*) FROM {table} WHERE {others})" for table in _CHAT_TABLES)
    return tuple(connection.execute(text(f"SELECT {counts}"), seeded_params()).one())


def seeded_counts(engine: Engine) -> ResetResult:
    """What ``reset`` would delete."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        return _seeded_counts(connection)


def _seeded_counts(connection: Connection) -> ResetResult:
    seeded = SEEDED.format("user_id")
    counts = connection.execute(
        text(
            f"SELECT (SELECT count(*) FROM users WHERE {SEEDED.format('id')}),"
            f" (SELECT count(*) FROM conversations WHERE {seeded}),"
            f" (SELECT count(*) FROM messages WHERE {seeded}),"
            f" (SELECT count(*) FROM conversations_archive WHERE {seeded}),"
            f" (SELECT count(*) FROM messages_archive WHERE {seeded})"
        ),
        seeded_params(),
    ).one()
    return ResetResult(*(int(count) for count in counts))
