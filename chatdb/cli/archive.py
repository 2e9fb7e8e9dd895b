"""``chatdb archive`` and ``chatdb archive restore``: idle conversations to the archive
tables, and back."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated

import typer

from chatdb import lifecycle
from chatdb.cli.common import JsonOutput, Yes, disposing
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import callback, command, new_app
from chatdb.cli.lifecycle import (
    ArchiveJobs,
    BatchSize,
    DryRun,
    Jobs,
    MaxRuntime,
    VacuumAfter,
    execute,
    needs_counts,
    optional_duration,
    signals,
)
from chatdb.errors import UsageError

# A conversation id as uuid.UUID reads it, in ASCII hex only (UUID() also takes other
# scripts' digits, underscores and blanks).
_UUID = re.compile(
    r"(?:urn:uuid:)?\{?[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}\}?", re.ASCII | re.IGNORECASE
)

app = new_app()


@callback(app, database=True, invoke_without_command=True)
def archive(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Move conversations idle longer than this (e.g. 180d, 26w, 1d12h).",
            show_default=False,
        ),
    ] = None,
    batch_size: BatchSize = lifecycle.DEFAULT_BATCH_SIZE,
    jobs: ArchiveJobs = lifecycle.DEFAULT_JOBS,
    dry_run: DryRun = False,
    yes: Yes = False,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            metavar="FILE",
            help="Also append each moved conversation, with its messages, as one JSON line "
            "to FILE.jsonl or FILE.jsonl.gz, a regular file or a new path (fsynced before each "
            "batch commits).",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    max_runtime: MaxRuntime = None,
    vacuum: VacuumAfter = False,
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
    duration = lifecycle.parse_duration(older_than, "--older-than")
    limit = optional_duration(max_runtime, "--max-runtime")
    if export is not None:
        lifecycle.check_export(export)  # before anything starts: a FIFO would block the run
    with (
        signals() as stops,
        disposing(open_engine(ctx, "archive")) as engine,
    ):
        plan = lifecycle.plan_archive(engine, duration, count=needs_counts(dry_run, yes))
        execute(
            plan,
            lambda options: lifecycle.archive(engine, plan, options, export),
            stops,
            verb="move",
            yes=yes,
            dry_run=dry_run,
            as_json=as_json,
            batch_size=batch_size,
            jobs=jobs,
            max_runtime=limit,
            arguments={
                "older_than": duration.text,
                "batch_size": batch_size,
                "jobs": jobs,
                "export": str(export) if export else None,
                "max_runtime": limit.text if limit else None,
                "vacuum": vacuum,
            },
            vacuum=(lambda result: lifecycle.vacuum(engine, result)) if vacuum else None,
        )


@command(app, "restore", database=True)
def restore(
    ctx: typer.Context,
    conversation: Annotated[
        list[str] | None,
        typer.Option(
            "--conversation",
            metavar="ID",
            help="An archived conversation's id (repeatable).",
            show_default=False,
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option("--user", metavar="ID", help="Restore every archived conversation of this user."),
    ] = None,
    batch_size: BatchSize = lifecycle.DEFAULT_BATCH_SIZE,
    jobs: Jobs = lifecycle.DEFAULT_JOBS,
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
    with (
        signals() as stops,
        disposing(open_engine(ctx, "archive restore")) as engine,
    ):
        plan = lifecycle.plan_restore(engine, ids, user)
        execute(
            plan,
            lambda options: lifecycle.restore(engine, plan, options),
            stops,
            verb="restore",
            yes=True,
            dry_run=False,
            as_json=as_json,
            batch_size=batch_size,
            jobs=jobs,
            max_runtime=None,
            arguments={"conversations": [str(i) for i in ids], "user": user, "batch_size": batch_size},
        )
