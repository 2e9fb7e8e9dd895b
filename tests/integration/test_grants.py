"""`chatdb grants` prints statements that run as printed and name exactly the role, schema
and database given, whatever their names: quoted where PostgreSQL needs it (a keyword, a
capital, a dash, a quote), never escaped as a driver would (a doubled `%`)."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from chatdb.schema import VERSION_TABLE, metadata

#: The tables the statements name: chatdb's, users, and the version table.
TABLES = (*metadata.tables, VERSION_TABLE)
HOT_AND_ARCHIVE = ("conversations", "messages", "conversations_archive", "messages_archive")


def statements(cli, **names: str) -> list[str]:
    args = {"app_role": "r2app", "ops_role": "r2ops", "database": "r2db", "schema": "r2s"} | names
    result = cli(
        "grants",
        "--json",
        "--app-role",
        args["app_role"],
        "--ops-role",
        args["ops_role"],
        "--database",
        args["database"],
        "--schema",
        args["schema"],
    )
    assert result.exit_code == 0, result.output
    return [s for grant in json.loads(result.stdout)["roles"] for s in grant["statements"]]


@pytest.mark.parametrize("option", ["app_role", "ops_role", "schema"])
@pytest.mark.parametrize(
    "name",
    [
        "50%off",
        "lateral",
        "system_user",
        "collation",
        "tablesample",
        'Chat"Bot',
        "chat-bot",
        "user",
        # in the dollar-quoted DO block that grants MAINTAIN from PostgreSQL 17
        "it's",
        "end$$",
        "x$grant$",
        "$grant",
    ],
)
def test_grants_name_exactly_the_role_and_schema_given(pg_server, cli, option, name):
    """Create the role and schema the statements should name, run the statements (as a
    superuser, rolled back): each must parse and name them, and from PostgreSQL 17 the
    operations role has MAINTAIN on the hot and archive tables."""
    names = {option: name}
    url = pg_server.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as connection:
        ops = names.get("ops_role", "r2ops")
        for role in (names.get("app_role", "r2app"), ops):
            connection.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        schema = names.get("schema", "r2s")
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for table in TABLES:
            connection.execute(
                sql.SQL("CREATE TABLE {}.{} ()").format(sql.Identifier(schema), sql.Identifier(table))
            )
        try:
            for statement in statements(cli, **names):
                if "ON DATABASE" in statement:
                    continue  # r2db does not exist; the database case is the next test
                connection.execute(statement)
            if connection.info.server_version >= 170000:
                maintain = connection.execute(
                    "SELECT c.relname FROM pg_class c WHERE c.relnamespace = to_regnamespace(%s)"
                    " AND has_table_privilege(%s, c.oid, 'MAINTAIN') ORDER BY c.relname",
                    (sql.Identifier(schema).as_string(connection), ops),
                ).fetchall()
                assert [table for (table,) in maintain] == sorted(HOT_AND_ARCHIVE), maintain
        finally:
            connection.rollback()


@pytest.mark.parametrize(
    ("name", "shown"), [("50%off", '"50%off"'), ("lateral", '"lateral"'), ("chat", "chat")]
)
def test_grants_name_exactly_the_database_given(cli, name, shown):
    granted = [statement for statement in statements(cli, database=name) if "ON DATABASE" in statement]
    assert len(granted) == 2 and all(f"ON DATABASE {shown} TO" in statement for statement in granted), granted


def test_grants_default_database_is_the_one_chatdb_connects_to(cli):
    """--database defaults to the configured URL's database, which libpq also reads from a
    dbname parameter."""
    result = cli(
        "grants",
        "--app-role",
        "a",
        "--ops-role",
        "b",
        "--database-url",
        "postgresql://ops@db.example.com/?dbname=chat",
    )
    assert "ON DATABASE chat " in result.stdout, result.stdout


def test_grants_names_the_dbname_parameter_over_the_path_as_libpq_connects(migrated_db, cli):
    """A URL with both a path and a dbname parameter: libpq connects to the parameter's
    database, and grants names that one."""
    path, query = migrated_db.cli_url.split("?", 1)
    url = f"{path.rsplit('/', 1)[0]}/postgres?{query}&dbname={migrated_db.name}"
    status = cli("status", "--json", "--database-url", url)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["database"] == migrated_db.name
    result = cli("grants", "--app-role", "a", "--ops-role", "b", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert f"ON DATABASE {migrated_db.name} TO a;" in result.stdout, result.stdout
