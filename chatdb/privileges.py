"""Least privilege: what each role may do, the GRANT statements that give it, and the
checks that name a missing privilege in one line before a command fails half-way.

Two roles besides the tables' owner (the role that runs ``chatdb migrate``):

- the application's role reads and writes the chat tables and reads the archive;
- the operations role runs ``archive``, ``purge``, ``status``, ``verify-indexes`` and
  ``doctor``: it reads and writes chatdb's tables, records runs in ``chatdb_runs`` and
  sizes in ``chatdb_size_history``, and creates temporary tables (``verify-indexes``
  builds the declared indexes on empty temporary copies). It owns nothing, so ``migrate``
  and ``seed``, the development and staging tools that create, alter, or take over
  tables, say which privilege it lacks. From PostgreSQL 17 it has ``MAINTAIN`` on the hot
  and archive tables, so that ``--vacuum`` may vacuum what a run changed (up to 16 only a
  table's owner may). For ``doctor`` it is also a member of
  ``pg_monitor`` (``pg_read_all_stats``: every session and statement;
  ``pg_stat_scan_tables``: pgstattuple), which only a superuser (or a managed service's
  admin role) may grant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, text

from chatdb.errors import PrivilegeError, UsageError
from chatdb.identifiers import quote
from chatdb.schema import (
    VERSION_TABLE,
    chatdb_runs,
    chatdb_size_history,
    conversations,
    conversations_archive,
    messages,
    messages_archive,
    users,
)

#: PostgreSQL truncates longer names; "public" and pg_* are not names a role can have.
_MAX_NAME_BYTES = 63
_RESERVED = re.compile(r"^(public|none|current_user|session_user|current_role|pg_.*)$", re.IGNORECASE)

HINT = "`chatdb grants` prints what each role needs; run migrate and seed as the owner of chatdb's tables"


@dataclass(frozen=True)
class RoleGrants:
    role: str
    kind: str  # "application" or "operations"
    may: str  # what the role may do, in one sentence
    statements: list[str]


def validate_role(name: str, option: str, what: str = "role") -> str:
    """A role (or other) name as typed by a user: any PostgreSQL identifier (it is always
    quoted)."""
    if not name or not name.strip():
        raise UsageError(f"{option}: the {what} name is empty")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise UsageError(f"{option} {name!r}: longer than {_MAX_NAME_BYTES} bytes")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UsageError(f"{option} {name!r}: contains a control character")
    if what == "role" and _RESERVED.match(name):
        raise UsageError(f"{option} {name!r}: a reserved name, not a role of its own")
    return name


def dollar_quoted(body: str, tag: str = "") -> str:
    """``body`` as a dollar-quoted string constant, which PostgreSQL (and psql) read
    without escapes: ``$tag$body$tag$``, the tag made longer (``tag_1``, ``tag_2``...)
    until nothing in ``body`` can end the constant early."""
    chosen, number = tag, 0
    while (body + f"${chosen}$").find(f"${chosen}$") != len(body):
        number += 1
        chosen = f"{tag}_{number}"
    return f"${chosen}${body}${chosen}$"


def from_version(version: int, statement: str) -> str:
    """``statement`` (without its ``;``) as a ``DO`` block that runs it on a server of
    ``version`` (server_version_num) or later and does nothing on an earlier one: one line
    that runs, as printed, on every version."""
    body = (
        f"BEGIN IF current_setting('server_version_num')::int >= {version} THEN "
        f"EXECUTE {dollar_quoted(statement, 'grant')}; END IF; END"
    )
    return f"DO {dollar_quoted(body)};"


def grant_statements(app_role: str, ops_role: str, database: str, schema: str = "public") -> list[RoleGrants]:
    """The GRANT statements for the application's role and the operations role. Run them
    as the owner of chatdb's tables."""
    app = quote(validate_role(app_role, "--app-role"))
    ops = quote(validate_role(ops_role, "--ops-role"))
    if app_role == ops_role:
        raise UsageError("--app-role and --ops-role must be different roles")
    db = quote(validate_role(database, "--database", "database"))
    sch = quote(validate_role(schema, "--schema", "schema"))

    def tables(*names: str) -> str:
        return ", ".join(f"{sch}.{quote(name)}" for name in names)

    chat = tables(conversations.name, messages.name)
    archive = tables(conversations_archive.name, messages_archive.name)
    return [
        RoleGrants(
            app_role,
            "application",
            "reads and writes conversations and messages (and users), reads the archive; "
            "never writes chatdb's audit or version tables",
            [
                f"GRANT CONNECT ON DATABASE {db} TO {app};",
                f"GRANT USAGE ON SCHEMA {sch} TO {app};",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {tables(users.name)}, {chat} TO {app};",
                f"GRANT SELECT ON TABLE {archive} TO {app};",
            ],
        ),
        RoleGrants(
            ops_role,
            "operations",
            "runs archive, purge, status, verify-indexes and doctor: reads and writes chatdb's tables, "
            "records runs and sizes, creates temporary tables; from PostgreSQL 17 may VACUUM and ANALYZE "
            "the hot and archive tables (MAINTAIN, the DO block), for archive and purge --vacuum; "
            "owns nothing, so it cannot migrate or seed",
            [
                f"GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {ops};",
                f"GRANT USAGE ON SCHEMA {sch} TO {ops};",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {chat}, {archive} TO {ops};",
                f"GRANT SELECT, INSERT, UPDATE ON TABLE {tables(chatdb_runs.name)} TO {ops};",
                f"GRANT SELECT, INSERT, DELETE ON TABLE {tables(chatdb_size_history.name)} TO {ops};",
                f"GRANT SELECT ON TABLE {tables(VERSION_TABLE, users.name)} TO {ops};",
                # MAINTAIN is PostgreSQL 17's: an earlier server refuses the GRANT itself.
                from_version(170000, f"GRANT MAINTAIN ON TABLE {chat}, {archive} TO {ops}"),
            ],
        ),
        RoleGrants(
            ops_role,
            "monitoring",
            "runs doctor, which needs pg_monitor: pg_read_all_stats (every session and statement) and "
            "pg_stat_scan_tables (pgstattuple for --deep). Only a superuser, or a role holding it with its "
            "admin option, may grant it. --deep's amcheck also needs, once that extension is installed: "
            f"GRANT EXECUTE ON FUNCTION bt_index_check(regclass, boolean) TO {ops};",
            [f"GRANT pg_monitor TO {ops};"],
        ),
    ]


# --- checks ------------------------------------------------------------------------------------


def _role_and_schema(connection: Connection) -> tuple[str, str]:
    return connection.execute(text("SELECT current_user, current_schema()")).one()


def not_owned(connection: Connection, names: Iterable[str]) -> list[str]:
    """The tables among ``names`` (those that exist) that the current role does not own,
    directly or through membership of the owning role."""
    return list(
        connection.execute(
            text(
                "SELECT c.relname FROM pg_class c"
                " WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:names)"
                " AND c.relkind IN ('r', 'p') AND NOT pg_has_role(current_user, c.relowner, 'USAGE')"
                " ORDER BY c.relname"
            ),
            {"names": list(names)},
        ).scalars()
    )


def require_migrate(connection: Connection, tables: Iterable[str]) -> None:
    """Migrating creates tables in the schema and alters chatdb's: it needs CREATE on the
    schema and ownership of the tables that exist."""
    role, schema = _role_and_schema(connection)
    if not connection.execute(text("SELECT has_schema_privilege(current_schema(), 'CREATE')")).scalar():
        raise PrivilegeError(
            f"permission denied: role {role} cannot create tables in schema {schema} "
            f"(migrate needs CREATE on schema {schema})",
            hint=HINT,
        )
    foreign = not_owned(connection, tables)
    if foreign:
        raise PrivilegeError(
            f"permission denied: role {role} does not own table {foreign[0]} "
            "(migrate alters chatdb's tables, which only their owner may do)",
            hint=HINT,
        )


def require_table_privileges(connection: Connection, needed: list[tuple[str, str]], purpose: str) -> None:
    """Raise PrivilegeError naming the first (privilege, table) of ``needed`` the current
    role lacks."""
    role, _ = _role_and_schema(connection)
    for privilege, table in needed:
        granted = connection.execute(
            text("SELECT has_table_privilege(to_regclass(:table), :privilege)"),
            {"table": quote(table), "privilege": privilege},
        ).scalar()
        if granted is False:
            preposition = {"INSERT": "into", "SELECT": "from", "DELETE": "from"}.get(privilege, "on")
            raise PrivilegeError(
                f"permission denied: role {role} cannot {privilege} {preposition} table {table} ({purpose})",
                hint=HINT,
            )
