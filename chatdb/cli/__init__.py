"""The ``chatdb`` command line: one thin function per command (parse, call, render)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from typing import Annotated

import typer

from chatdb import __version__, embedded
from chatdb import status as status_module
from chatdb.cli import bench, doctor, grants, lifecycle, migrate, verify
from chatdb.cli import seed as seed_command
from chatdb.cli.common import (
    ConnectTimeout,
    DatabaseUrl,
    JsonOutput,
    closed_pipe,
    disposing,
    err,
    handle_errors,
    human_bytes,
    open_engine,
    out,
    print_json,
    report_error,
    settings,
    table,
)
from chatdb.errors import EXIT_PROBLEM, EXIT_USAGE

app = typer.Typer(
    name="chatdb",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never print locals (secrets) in a traceback
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(migrate.app, name="migrate")
app.command("seed")(handle_errors(seed_command.seed))
app.add_typer(lifecycle.archive_app, name="archive")
app.command("purge")(lifecycle.purge)
app.command("verify-indexes")(handle_errors(verify.verify_indexes))
app.command("grants")(handle_errors(grants.grants))

embedded_app = typer.Typer()
app.add_typer(embedded_app, name="embedded")


@embedded_app.callback()
def embedded_group() -> None:
    """The embedded PostgreSQL that chatdb uses when no database URL is configured. It
    keeps running between commands; its data lives in the nearest .chatdb/ folder (here
    or in a parent folder, else a new one here), or in CHATDB_HOME when set.

    Example:

        chatdb embedded url && chatdb embedded stop
    """


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"chatdb {__version__}")
        except BrokenPipeError:
            closed_pipe()
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    connect_timeout: ConnectTimeout = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Admin and operations CLI for the PostgreSQL store of an AI chatbot.

    Example:

        chatdb migrate && chatdb status
    """
    state = settings(ctx)
    state.database_url = database_url
    state.connect_timeout = connect_timeout


@app.command("status")
@handle_errors
def status(
    ctx: typer.Context,
    as_json: JsonOutput = False,
    database_url: DatabaseUrl = None,
    connect_timeout: ConnectTimeout = None,
) -> None:
    """Server version, schema revision against head, row counts and sizes of chatdb's
    tables, and the latest archive/purge runs.

    Example:

        chatdb status --json
    """
    with disposing(open_engine(ctx, "status", database_url, connect_timeout)) as engine:
        report = status_module.gather(engine)
    migration = report.migration
    if as_json:
        print_json(
            "status",
            True,
            server_version=report.server_version,
            database=report.database,
            user=report.user,
            revision={
                "current": migration.current,
                "head": migration.head,
                "pending": [r.id for r in migration.pending],
                "known": migration.known,
                "up_to_date": migration.up_to_date,
            },
            tables=report.tables,
            runs=report.runs,
            **({"placements": report.placements} if report.placements is not None else {}),
        )
        return
    out.print(f"PostgreSQL {report.server_version}, database {report.database} as {report.user}")
    if not migration.known:
        state = f"[red]{migration.current} (unknown to this chatdb)[/red]"
    elif migration.current is None and any(t.name != "users" for t in report.tables):
        state = (
            "[yellow]no chatdb revision, yet chatdb's tables exist[/yellow]"
            " (adopt them: `chatdb migrate stamp REV`)"
        )
    elif migration.current is None:
        state = "[yellow]not migrated[/yellow] (run `chatdb migrate`)"
    elif migration.pending:
        state = f"[yellow]{migration.current}, {len(migration.pending)} behind head[/yellow]"
    else:
        state = f"{migration.current} (head)"
    out.print(f"revision: {state}")
    if report.tables:
        out.print(
            table(
                None,
                ["table", ">rows", ">size", "owner"],
                (
                    (
                        t.name,
                        f"{t.rows:,}" if t.rows_exact else f"~{t.rows:,}",
                        human_bytes(t.total_bytes),
                        t.owner,
                    )
                    for t in report.tables
                ),
            )
        )
    if report.placements:
        out.print(
            table(
                "Shards on Citus",
                ["table", "node", ">shards", ">size"],
                ((p.table, p.node, p.shards, human_bytes(p.total_bytes)) for p in report.placements),
            )
        )
    if report.runs:
        out.print(
            table(
                "Latest runs",
                # Who ran it, when it ended and the full counts: `chatdb status --json`.
                ["id", "command", "outcome", "started (UTC)", ">conversations", ">messages"],
                (
                    (
                        r.id,
                        r.command,
                        r.outcome,
                        f"{r.started_at.astimezone(dt.UTC):%Y-%m-%d %H:%M}",
                        f"{r.done('conversations'):,}",
                        f"{r.done('messages'):,}",
                    )
                    for r in report.runs
                ),
            )
        )
    elif migration.current is not None:
        out.print("No archive or purge runs yet.")


app.command("bench")(handle_errors(bench.bench_command))
app.command("doctor")(handle_errors(doctor.doctor))


@embedded_app.command("stop")
@handle_errors
def embedded_stop() -> None:
    """Stop the embedded PostgreSQL server (its data stays in its .chatdb/ folder).

    Example:

        chatdb embedded stop
    """
    home = embedded.locate()
    if home.source == "new":
        out.print(f"No embedded PostgreSQL here: no {embedded.FOLDER}/ in this folder or any parent folder.")
    elif embedded.stop(home.path):
        out.print(f"Stopped the embedded PostgreSQL in {home.path}.", markup=False)
    else:
        out.print(f"The embedded PostgreSQL in {home.path} is not running.", markup=False)


@embedded_app.command("url")
@handle_errors
def embedded_url() -> None:
    """Start the embedded server if needed and print its URL (for psql and friends).

    Example:

        psql "$(chatdb embedded url)"
    """
    url = embedded.ensure_running()
    if embedded.last_started.created:
        err.print(f"chatdb: {embedded.last_started.describe()}", markup=False)
    typer.echo(url.set(drivername="postgresql").render_as_string(hide_password=False))


# Click's exception classes, wherever this Typer keeps them (Click itself, or a copy).
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The console script: usage errors, like every other error, are one line."""
    if not os.environ.get("CHATDB_DEBUG"):
        # chatdb reports each error itself, on one line. Libraries log their own on the way
        # (psycopg: "error ignored terminating <psycopg.Copy [BAD]>" when a COPY loses its
        # connection), which logging's last-resort handler would print on stderr too.
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        code = _run()
    except BrokenPipeError:  # the JSON of a usage error to a closed pipe
        closed_pipe()
    raise SystemExit(code if isinstance(code, int) else 0)


def _run() -> object:
    try:
        return app(prog_name="chatdb", standalone_mode=False)
    except _USAGE_ERROR as exc:
        if exc.format_message():  # empty after printing the help for no arguments
            command = exc.ctx.command_path if exc.ctx is not None else "chatdb"
            hint = f"see `{command} --help`"
            report_error(exc.format_message(), hint)
            if "--json" in sys.argv[1:]:  # the one JSON object, as for every other error
                name = command.removeprefix("chatdb").strip()
                print_json(name, False, error=exc.format_message(), exit_code=EXIT_USAGE, hint=hint)
        return EXIT_USAGE
    except typer.Abort:
        report_error("aborted")
        return EXIT_PROBLEM
    except _CLICK_EXCEPTION as exc:
        report_error(exc.format_message())
        return exc.exit_code
