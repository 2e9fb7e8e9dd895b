"""``chatdb archive`` and ``chatdb archive restore``: idle conversations to the archive
tables, and back."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from chatdb.cli import lifecycle as lifecycle_cli
from chatdb.cli.declare import callback, command, new_app
from chatdb.cli.options import JsonOutput, Yes, option
from chatdb.defaults import DEFAULT_BATCH_SIZE, DEFAULT_JOBS
from chatdb.errors import UsageError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from chatdb.lifecycle import Duration, Plan

# A conversation id as uuid.UUID reads it, in ASCII hex only (UUID() also takes other
# scripts' digits, underscores and blanks).
_UUID = re.compile(
    r"(?:urn:uuid:)?\{?[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}\}?", re.ASCII | re.IGNORECASE
)

app = new_app()

OlderThan = Annotated[
    str | None,
    option("--older-than", "DURATION", "Move conversations idle longer than this (e.g. 180d, 26w, 1d12h)."),
]
Export = Annotated[
    Path | None,
    option(
        "--export",
        "FILE",
        "Also append each moved conversation, with its messages, as one JSON line to FILE.jsonl or "
        "FILE.jsonl.gz, a regular file or a new path (fsynced before each batch commits).",
        dir_okay=False,
    ),
]
Conversation = Annotated[
    list[str] | None, option("--conversation", "ID", "An archived conversation's id (repeatable).")
]
User = Annotated[str | None, option("--user", "ID", "Restore every archived conversation of this user.")]


@callback(app, database=True, invoke_without_command=True)
def archive(
    ctx: typer.Context,
    older_than: OlderThan = None,
    batch_size: lifecycle_cli.BatchSize = DEFAULT_BATCH_SIZE,
    jobs: lifecycle_cli.ArchiveJobs = DEFAULT_JOBS,
    dry_run: lifecycle_cli.DryRun = False,
    yes: Yes = False,
    export: Export = None,
    max_runtime: lifecycle_cli.MaxRuntime = None,
    vacuum: lifecycle_cli.VacuumAfter = False,
    as_json: JsonOutput = False,
) -> None:
    """Move idle conversations, whole, with all their messages, into the archive tables.

    A conversation is idle when its last activity (updated_at) is older than --older-than,
    by the database's clock. Soft-deleted conversations stay where they are (purge
    removes them). Rows move unchanged; archived_at records when. Work is done in short
    batches that lock only the conversations they move and skip any the application is
    writing to. Off a terminal it runs without asking (a cron job); Ctrl-C or SIGTERM
    stop after the current batch, and running it again finishes the job.

    Example:

        chatdb archive --older-than 180d --dry-run

        chatdb archive --older-than 180d --export archive-2026-11.jsonl.gz --yes

        chatdb archive restore --user user_2Nf8
    """
    if ctx.invoked_subcommand is not None:
        if older_than is not None or dry_run or export is not None or as_json or vacuum:
            raise UsageError(
                f"archive's options go after the subcommand (`chatdb archive {ctx.invoked_subcommand} ...`)"
            )
        return
    if older_than is None:
        raise UsageError("--older-than is required (for example `chatdb archive --older-than 180d`)")
    from chatdb import lifecycle

    duration = lifecycle.parse_duration(older_than, "--older-than")
    limit = lifecycle_cli.optional_duration(max_runtime, "--max-runtime")
    if export is not None:
        lifecycle.check_export(export)  # before anything starts: a FIFO would block the run
    lifecycle_cli.run_command(
        ctx,
        lifecycle_cli.Request("archive", "move", batch_size, jobs, yes, dry_run, as_json, limit, vacuum),
        lambda engine, count: _plan(engine, duration, count, export if dry_run else None),
        lambda engine, plan, options: lifecycle.archive(engine, plan, options, export),
        {
            "older_than": duration.text,
            "batch_size": batch_size,
            "jobs": jobs,
            "export": str(export) if export else None,
            "max_runtime": limit.text if limit else None,
            "vacuum": vacuum,
        },
    )


def _plan(engine: Engine, duration: Duration, count: bool, export: Path | None) -> Plan:
    """The archive's plan; with ``export`` (a dry run's), first what the run would refuse
    of that file before it appends (a damaged file, lines it would not cut)."""
    from chatdb import lifecycle

    if export is not None:
        lifecycle.check_export_contents(engine, export)
    return lifecycle.plan_archive(engine, duration, count=count)


@command(app, "restore", database=True)
def restore(
    ctx: typer.Context,
    conversation: Conversation = None,
    user: User = None,
    batch_size: lifecycle_cli.BatchSize = DEFAULT_BATCH_SIZE,
    jobs: lifecycle_cli.Jobs = DEFAULT_JOBS,
    as_json: JsonOutput = False,
) -> None:
    """Move archived conversations back to the hot tables, exactly as they were, with all
    their messages. If a named conversation is in neither the archive nor the hot tables,
    nothing is restored; one already in the hot tables is left as it is, so running a
    stopped restore again finishes it. A --user that is not in the users table is an
    error. A restored conversation keeps its old updated_at, so the next `chatdb archive`
    moves it again unless it receives a message first.

    Example:

        chatdb archive restore --conversation 0b9f2c1e-6d1a-4c9e-9a51-3f1f0d2b7a10

        chatdb archive restore --user user_2Nf8 --json
    """
    ids = []
    for raw in conversation or []:
        if not _UUID.fullmatch(raw):
            raise UsageError(f"--conversation {raw!r} is not a conversation id (a UUID)")
        ids.append(uuid.UUID(raw))
    if bool(ids) == (user is not None):
        raise UsageError("give either --conversation ID (one or more) or --user ID")
    if user is not None and not user.strip():
        raise UsageError("--user: the user id is empty")
    from chatdb import lifecycle

    lifecycle_cli.run_command(
        ctx,
        lifecycle_cli.Request("archive restore", "restore", batch_size, jobs, yes=True, as_json=as_json),
        lambda engine, count: lifecycle.plan_restore(engine, ids, user),
        lifecycle.restore,
        {"conversations": [str(i) for i in ids], "user": user, "batch_size": batch_size},
    )
