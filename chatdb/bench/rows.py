"""bench's own rows: a user and a conversation per client, under a run token that an
advisory lock marks as alive, and the cleanup of runs that died."""

from __future__ import annotations

import secrets

from sqlalchemy import Connection, Engine, text

from chatdb import citus, migrations
from chatdb.bench import workload
from chatdb.bench.model import Removed
from chatdb.errors import StateError

#: The advisory lock class of bench runs ("benc"); the run's token is the other half.
_LOCK_CLASS = 0x62656E63

_FILL = {"S": "text", "B": "false", "D": "now", "N": "zero"}


def user_columns(connection: Connection) -> list[tuple[str, str]] | str:
    """The columns of users, besides id, that need a value: (name, how to fill it), or why
    bench cannot fill one. The application's users table may hold more than chatdb's."""
    rows = connection.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory"
            " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = to_regclass('users') AND a.attnum > 0 AND NOT a.attisdropped"
            " AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''"
            " AND a.attname <> 'id' ORDER BY a.attnum"
        )
    ).all()
    columns = []
    for name, type_name, category in rows:
        if category not in _FILL:
            return f"users has a required column {name} ({type_name}) that bench cannot fill"
        columns.append((name, _FILL[category]))
    return columns


class Guard:
    """Marks a run as alive: a transaction-level advisory lock on the run's token, held in
    an open transaction on a connection of its own (as archive and purge do), so it dies
    with the process, also through a transaction pooler. Cleanup removes only the rows of
    runs whose lock is free."""

    def __init__(self, engine: Engine) -> None:
        self.connection = engine.connect()
        self.token: str | None = None

    def acquire(self) -> str:
        for _ in range(20):
            token = secrets.token_hex(4)
            self.connection.begin()
            self.connection.execute(
                text("SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
            )
            if try_lock(self.connection, token):
                self.token = token
                return token
            self.connection.rollback()
        raise StateError("could not take a run token: too many bench runs at once")

    def release(self) -> None:
        try:
            if self.connection.in_transaction():
                self.connection.rollback()
        finally:
            self.connection.close()


def try_lock(connection: Connection, token: str) -> bool:
    objid = int(token, 16)
    objid -= (1 << 32) if objid >= (1 << 31) else 0
    return bool(
        connection.execute(
            text("SELECT pg_try_advisory_xact_lock(:a, :b)"), {"a": _LOCK_CLASS, "b": objid}
        ).scalar()
    )


def create_rows(engine: Engine, token: str, clients: int) -> int:
    """One user and one conversation per pgbench client, in one transaction."""
    with engine.connect() as connection, connection.begin():
        columns = user_columns(connection)
        assert not isinstance(columns, str)
        quote = connection.dialect.identifier_preparer.quote
        user = "'bench-' || :token || '-' || g"
        values = {
            "text": lambda name: f"{user} || '@bench.invalid'" if "mail" in name.lower() else user,
            "false": lambda name: "false",
            "now": lambda name: "now()",
            "zero": lambda name: "0",
        }
        names = ", ".join(["id", *(quote(name) for name, _ in columns)])
        filled = ", ".join([user, *(values[kind](name) for name, kind in columns)])
        connection.execute(
            text(f"INSERT INTO users ({names}) SELECT {filled} FROM generate_series(0, :last) g"),
            {"token": token, "last": clients - 1},
        )
        connection.execute(
            text(
                "INSERT INTO conversations (id, user_id, title)"
                " SELECT CAST(:token || '-0000-4000-8000-' || lpad(to_hex(g), 12, '0') AS uuid),"
                f" {user}, 'chatdb bench' FROM generate_series(0, :last) g"
            ),
            {"token": token, "last": clients - 1},
        )
    return clients


def remove_run(connection: Connection, token: str) -> Removed:
    """Delete the users of one run and, by cascade, everything of theirs."""
    # On Citus, users is written after the counts read the distributed tables.
    citus.sequential(connection)
    prefix = f"{workload.USER_PREFIX}{token}-"
    mine = "starts_with(user_id, :prefix) AND user_id ~ :pattern"
    params = {"prefix": prefix, "pattern": workload.USER_ID_PATTERN}
    conversations, messages_ = connection.execute(
        text(
            f"SELECT (SELECT count(*) FROM conversations WHERE {mine}),"
            f" (SELECT count(*) FROM messages WHERE {mine})"
        ),
        params,
    ).one()
    users = connection.execute(
        text("DELETE FROM users WHERE starts_with(id, :prefix) AND id ~ :pattern"), params
    ).rowcount
    return Removed(users, int(conversations), int(messages_), 1 if users else 0)


def cleanup(engine: Engine, *, keep: str | None = None) -> Removed:
    """Remove what bench runs that died (SIGKILL, a lost host) left behind: their users and,
    by cascade, everything of theirs. Runs still going are left alone."""
    migrations.require_head(engine)
    with engine.connect() as connection:
        tokens = (
            connection.execute(
                text("SELECT DISTINCT substr(id, 7, 8) FROM users WHERE id ~ :pattern"),
                {"pattern": workload.USER_ID_PATTERN},
            )
            .scalars()
            .all()
        )
        connection.rollback()
    removed = Removed()
    for token in tokens:
        if token == keep or not workload.valid_token(token):
            continue
        with engine.connect() as connection, connection.begin():
            if not try_lock(connection, token):
                removed += Removed(running=1)
                continue
            removed += remove_run(connection, token)
    return removed
