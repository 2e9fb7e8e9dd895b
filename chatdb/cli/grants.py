"""``chatdb grants``: the GRANT statements for the application's and the operations role."""

from __future__ import annotations

from typing import Annotated

import typer

from chatdb.cli.common import print_json
from chatdb.cli.connect import configured_url
from chatdb.cli.declare import command, new_app
from chatdb.cli.options import JsonOutput

app = new_app()


# --database-url alone: grants only reads the database's name from it.
@command(app, "grants", database="url")
def grants(
    ctx: typer.Context,
    app_role: Annotated[str, typer.Option("--app-role", metavar="ROLE", help="The chatbot backend's role.")],
    ops_role: Annotated[
        str,
        typer.Option(
            "--ops-role",
            metavar="ROLE",
            help="The role that runs archive, purge, status, verify-indexes, doctor.",
        ),
    ],
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="NAME",
            help="Database to grant CONNECT on (default: the configured URL's, else chatdb).",
            show_default=False,
        ),
    ] = None,
    schema: Annotated[
        str, typer.Option("--schema", metavar="NAME", help="Schema of chatdb's tables.")
    ] = "public",
    as_json: JsonOutput = False,
) -> None:
    """Print the GRANT statements for the application's role and the operations
    role. Needs no database. Run them as the owner of chatdb's tables, after
    `chatdb migrate`.

    The application's role reads and writes conversations, messages and users,
    and reads the archive. The operations role runs archive, purge, status,
    verify-indexes and doctor: it reads and writes chatdb's tables, records runs
    in chatdb_runs and sizes in chatdb_size_history, and creates temporary
    tables; on PostgreSQL 17 and later it may also vacuum the hot and archive
    tables (MAINTAIN, which a DO block grants only there), for --vacuum; doctor
    also needs pg_monitor, which the last statement grants (as a superuser).
    Neither owns a table, so neither can migrate or seed: those run as the
    owner.

    Example:

        chatdb grants --app-role chatbot --ops-role chatdb_ops > grants.sql
    """
    from chatdb import db, embedded, privileges

    if database is None:
        configured = db.configured_database(configured_url(ctx))
        if configured is not None:  # the database chatdb connects to: its dbname, else the URL's path
            # (libpq reads the query after the path: a dbname parameter wins)
            named = configured.url.query.get("dbname") or configured.url.database
            database = named if isinstance(named, str) and named else None
    roles = privileges.grant_statements(
        app_role, ops_role, embedded.DATABASE_NAME if database is None else database, schema
    )
    if as_json:
        print_json("grants", True, roles=roles)
        return
    for number, grant in enumerate(roles):
        if number:
            typer.echo()
        typer.echo(f"-- {grant.kind} role {grant.role}: {grant.may}")
        for statement in grant.statements:
            typer.echo(statement)
