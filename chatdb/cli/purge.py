"""``chatdb purge``: retention, in short batches."""

from __future__ import annotations

from typing import Annotated

import typer

from chatdb import lifecycle
from chatdb.cli.common import JsonOutput, Yes, disposing
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.lifecycle import (
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

app = new_app()


@command(app, "purge", database=True)
def purge(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Delete conversations idle longer than this, hot and archived (e.g. 365d).",
            show_default=False,
        ),
    ],
    deleted_grace: Annotated[
        str,
        typer.Option(
            "--deleted-grace",
            metavar="DURATION",
            help="Also delete soft-deleted conversations and messages deleted longer ago than this.",
        ),
    ] = lifecycle.DEFAULT_DELETED_GRACE,
    batch_size: BatchSize = lifecycle.DEFAULT_BATCH_SIZE,
    jobs: Jobs = lifecycle.DEFAULT_JOBS,
    dry_run: DryRun = False,
    yes: Yes = False,
    max_runtime: MaxRuntime = None,
    vacuum: VacuumAfter = False,
    as_json: JsonOutput = False,
) -> None:
    """Enforce retention: permanently delete conversations idle longer than --older-than,
    with all their messages, from the hot and the archive tables; and soft-deleted
    conversations and messages whose deleted_at is older than --deleted-grace.

    The cutoffs come from the database's clock. Work is done in short batches that lock
    only what they delete and re-check it under the lock: a conversation that receives a
    message while the purge runs is kept. Users are never deleted. Off a terminal it runs
    without asking (a cron job); Ctrl-C or SIGTERM stop after the current batch.

    Example:

        chatdb purge --older-than 365d --dry-run

        chatdb purge --older-than 90d --deleted-grace 30d --max-runtime 20m --yes --json
    """
    duration = lifecycle.parse_duration(older_than, "--older-than")
    grace = lifecycle.parse_duration(deleted_grace, "--deleted-grace")
    limit = optional_duration(max_runtime, "--max-runtime")
    with signals() as stops, disposing(open_engine(ctx, "purge")) as engine:
        plan = lifecycle.plan_purge(engine, duration, grace, count=needs_counts(dry_run, yes))
        execute(
            plan,
            lambda options: lifecycle.purge(engine, plan, options),
            stops,
            verb="delete",
            yes=yes,
            dry_run=dry_run,
            as_json=as_json,
            batch_size=batch_size,
            jobs=jobs,
            max_runtime=limit,
            arguments={
                "older_than": duration.text,
                "deleted_grace": grace.text,
                "batch_size": batch_size,
                "jobs": jobs,
                "max_runtime": limit.text if limit else None,
                "vacuum": vacuum,
            },
            vacuum=(lambda result: lifecycle.vacuum(engine, result)) if vacuum else None,
        )
