"""``chatdb status``: what is in the database."""

from __future__ import annotations

import datetime as dt

import typer

from chatdb.cli.common import disposing, human_bytes, json_fields, out, print_json, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.options import JsonOutput

app = new_app()


@command(app, "status", database=True)
def status(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """Server version, schema revision against head, row counts and sizes of chatdb's
    tables, and the latest archive/purge runs.

    Example:

        chatdb status --json
    """
    from chatdb import status as status_module

    with disposing(open_engine(ctx, "status")) as engine:
        report = status_module.gather(engine)
    migration = report.migration
    if as_json:
        print_json(
            "status",
            True,
            **json_fields(report, "server_version", "database", "user"),
            revision=migration.as_dict(),
            tables=report.tables,
            runs=report.runs,
            recorded=report.sizes_recorded,
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
