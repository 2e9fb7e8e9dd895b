"""``chatdb migrate``: create and evolve the schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from chatdb.cli.common import confirm, disposing, err, json_fields, out, print_json, report_error, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import callback, command, new_app
from chatdb.cli.options import JsonOutput, Yes, option
from chatdb.defaults import BASE
from chatdb.errors import EXIT_PROBLEM, UsageError

if TYPE_CHECKING:
    from chatdb import migrations

app = new_app()

Target = Annotated[str, option("--to", "REV", "Target revision: an id, a unique prefix of one, or head.")]


ReferenceUsers = Annotated[
    bool,
    typer.Option(
        "--reference-users",
        help="On Citus: make the application's users table a reference table"
        " (SELECT create_reference_table('users')); without it, migrate stops and says so.",
    ),
]


def _show(revision: str | None) -> str:
    return revision or "base (empty)"


def _count(number: int, noun: str) -> str:
    """``1 table``, ``43,811 rows``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


@callback(app, database=True, invoke_without_command=True)
def migrate(
    ctx: typer.Context,
    to: Target = "head",
    reference_users: ReferenceUsers = False,
    as_json: JsonOutput = False,
) -> None:
    """Create and evolve chatdb's schema. Without a subcommand: upgrade the database to
    head (or --to REV); running it again is a no-op.

    On a Citus coordinator it also distributes the tables by user_id.

    Example:

        chatdb migrate

        chatdb migrate --to 0003 --database-url postgresql://ops@db.internal/chat
    """
    if ctx.invoked_subcommand is not None:  # only the group's context names one
        if to != "head" or as_json or reference_users:
            raise UsageError(
                "--to, --reference-users and --json go after the subcommand"
                f" (`chatdb migrate {ctx.invoked_subcommand} ...`)"
            )
        return
    _upgrade(ctx, to, as_json, reference_users)


_UP = """Upgrade to head (or --to REV); the same as a plain `chatdb migrate`.

    Example:

        chatdb migrate up --to 0002
    """
# `chatdb migrate up` is a plain `chatdb migrate`: the same function, with help of its own.
command(app, "up", database=True, doc=_UP)(migrate)


def _upgrade(ctx: typer.Context, to: str, as_json: bool, reference_users: bool = False) -> None:
    from chatdb import migrations

    with disposing(open_engine(ctx, "migrate")) as engine:
        result = migrations.upgrade(engine, to, reference_users=reference_users)
    if as_json:
        print_json(
            "migrate",
            True,
            **json_fields(result, "previous", "current", "applied", "distributed", "citus_local", "elapsed"),
        )
        return
    if result.applied:
        out.print(
            f"Migrated from {_show(result.previous)} to {_show(result.current)}: "
            f"applied {', '.join(result.applied)} in {result.elapsed:.2f} s."
        )
    elif not result.distributed and not result.citus_local:
        out.print(f"Already at {_show(result.current)}; nothing to do.")
    if result.distributed:
        out.print(f"Distributed by user_id on Citus, co-located: {', '.join(result.distributed)}.")
    if result.citus_local:
        out.print(
            f"Added to Citus's metadata, on the coordinator: {', '.join(result.citus_local)} "
            "(each batch commits with its audit row in two phases)."
        )


@command(
    app,
    "down",
    database=True,
    context_settings={"ignore_unknown_options": True},  # so that a bare -1 is a revision
)
def down(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="Target: a revision id, -1 (one step), -N, or base.")],
    yes: Yes = False,
    as_json: JsonOutput = False,
) -> None:
    """Downgrade to REVISION. Shows the tables (with row counts) and columns it would drop,
    then asks; off a terminal it refuses without --yes.

    Example:

        chatdb migrate down -1

        chatdb migrate down base --yes
    """
    from chatdb import migrations

    with disposing(open_engine(ctx, "migrate down")) as engine:
        plan = migrations.plan_downgrade(engine, revision)
        if not plan.revisions:
            if as_json:
                print_json("migrate down", True, previous=plan.current, current=plan.current, undone=[])
            else:
                out.print(f"Already at {_show(plan.current)}; nothing to do.")
            return
        if not as_json:
            _render_plan(plan)
        losses = []
        if plan.tables:
            rows = sum(t.rows for t in plan.tables)
            losses.append(f"{_count(len(plan.tables), 'table')} holding {_count(rows, 'row')}")
        if plan.columns:
            values = sum(c.values for c in plan.columns)
            losses.append(f"{_count(len(plan.columns), 'column')} holding {_count(values, 'value')}")
        confirm(
            f"Downgrade from {plan.current} to {_show(plan.target)}"
            + (f", dropping {' and '.join(losses)}" if losses else "")
            + "?",
            yes=yes,
            off_terminal="refuse",
        )
        result = migrations.downgrade(engine, revision)
    if as_json:
        print_json(
            "migrate down",
            True,
            **json_fields(result, "previous", "current"),
            undone=result.applied,
            dropped_tables=plan.tables,
            dropped_columns=plan.columns,
            **json_fields(result, "elapsed"),
        )
    else:
        out.print(
            f"Downgraded from {_show(result.previous)} to {_show(result.current)} in {result.elapsed:.2f} s."
        )


def _render_plan(plan: migrations.DowngradePlan) -> None:
    err.print(f"Downgrade from {plan.current} to {_show(plan.target)} undoes: {', '.join(plan.revisions)}")
    if plan.tables:
        err.print(
            table("Tables to drop", ["table", ">rows"], ((t.table, f"{t.rows:,}") for t in plan.tables))
        )
    if plan.columns:
        err.print(
            table(
                "Columns to drop",
                ["table", "column", ">values"],
                ((c.table, c.column, f"{c.values:,}") for c in plan.columns),
            )
        )


@command(app, "status", database=True)
def status(
    ctx: typer.Context,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 when any revision is pending (for CI).")
    ] = False,
    as_json: JsonOutput = False,
) -> None:
    """Current revision, head, and the pending revisions.

    Example:

        chatdb migrate status --check
    """
    from chatdb import migrations

    with disposing(open_engine(ctx, "migrate status")) as engine:
        state = migrations.status(engine)
    failed = not state.known or (check and bool(state.pending))
    problem = None if state.known else migrations.unknown_revision(state.current or "")
    if as_json:
        print_json(
            "migrate status",
            not failed,
            **state.as_dict(),
            **({"error": problem.message} if problem else {}),
        )
    else:
        if state.unstamped:
            out.print(
                f"current: [yellow]none recorded, yet chatdb's tables exist[/yellow] "
                f"({', '.join(state.unstamped)}); adopt them with `chatdb migrate stamp REV`"
            )
        else:
            out.print(f"current: {_show(state.current)}")
        out.print(f"head:    {state.head}")
        if state.pending:
            out.print(
                table(
                    f"{len(state.pending)} pending",
                    ["revision", "description"],
                    ((r.id, r.message) for r in state.pending),
                )
            )
        elif state.known:
            out.print("Up to date.")
    if problem:
        report_error(problem.message, problem.hint)
    if failed:
        raise typer.Exit(EXIT_PROBLEM)


@command(app, "history")
def history(as_json: JsonOutput = False) -> None:
    """The migration chain, oldest first. Needs no database.

    Example:

        chatdb migrate history
    """
    from chatdb import migrations

    chain = migrations.chain()
    if as_json:
        print_json("migrate history", True, revisions=chain, head=chain[-1].id)
        return
    rows = ((r.id, r.down or "", r.message + (" (head)" if r is chain[-1] else "")) for r in chain)
    rendered = table(None, ["revision", "down from", "description"], rows)
    if out.width >= 2 * max(len(r.id) for r in chain) + 30:
        for column in rendered.columns[:2]:
            column.no_wrap = True  # a revision id stays whole; the description folds
    out.print(rendered)


@command(app, "stamp", database=True)
def stamp(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="The revision the existing tables match.")],
    as_json: JsonOutput = False,
) -> None:
    """Adopt tables that an earlier application release created: prove the live schema
    matches REVISION exactly, then record REVISION without running any migration.

    Example (a database built by the application's own seed-001 migrations):

        chatdb migrate stamp 0002 && chatdb migrate
    """
    from chatdb import migrations

    with disposing(open_engine(ctx, "migrate stamp")) as engine:
        try:
            result = migrations.stamp(engine, revision)
        except migrations.SchemaMismatch as mismatch:
            if not as_json:  # with --json, the error's differences say it
                _show_differences(mismatch)
            raise
    if as_json:
        print_json("migrate stamp", True, **json_fields(result))
    else:
        out.print(
            f"The live schema matches {_show(result.current)} "
            f"({', '.join(result.compared_tables) or 'no tables'}); stamped."
        )


def _show_differences(mismatch: migrations.SchemaMismatch) -> None:
    """Every difference, in a table before the error line (as a plan is)."""
    err.print(
        table(
            f"The live schema differs from revision {mismatch.revision}",
            ["table", "what", f"{mismatch.revision} expects", "the database has"],
            (
                (
                    d.table,
                    f"{d.kind} {d.name}" if d.name and d.kind != "table" else d.kind,
                    "(none)" if d.expected is None else d.expected,
                    "(none)" if d.actual is None else d.actual,
                )
                for d in mismatch.differences
            ),
        )
    )


@command(app, "sql")
def sql(
    start: Annotated[
        str, option("--from", "REV", "Revision the database is at; base is an empty database.")
    ] = BASE,
    end: Annotated[str, option("--to", "REV", "Revision to reach.")] = "head",
) -> None:
    """Print the migration SQL for review, without touching any database. It applies with
    `psql -v ON_ERROR_STOP=1 -f`; CREATE INDEX CONCURRENTLY stands outside a transaction.

    Example:

        chatdb migrate sql --from 0002 > upgrade.sql
    """
    from chatdb import migrations

    typer.echo(migrations.offline_sql(start, end), nl=False)
