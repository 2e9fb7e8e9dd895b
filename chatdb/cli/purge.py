"""``chatdb purge``: retention, in short batches."""

from __future__ import annotations

from typing import Annotated

import typer

from chatdb.cli import lifecycle as lifecycle_cli
from chatdb.cli.declare import command, new_app
from chatdb.cli.options import JsonOutput, Yes, option
from chatdb.defaults import DEFAULT_BATCH_SIZE, DEFAULT_DELETED_GRACE, DEFAULT_JOBS

app = new_app()

OlderThan = Annotated[
    str,
    option(
        "--older-than",
        "DURATION",
        "Delete conversations idle longer than this, hot and archived (e.g. 365d).",
    ),
]
DeletedGrace = Annotated[
    str,
    option(
        "--deleted-grace",
        "DURATION",
        "Also delete soft-deleted conversations and messages deleted longer ago than this.",
    ),
]


@command(app, "purge", database=True)
def purge(
    ctx: typer.Context,
    older_than: OlderThan,
    deleted_grace: DeletedGrace = DEFAULT_DELETED_GRACE,
    batch_size: lifecycle_cli.BatchSize = DEFAULT_BATCH_SIZE,
    jobs: lifecycle_cli.Jobs = DEFAULT_JOBS,
    dry_run: lifecycle_cli.DryRun = False,
    yes: Yes = False,
    max_runtime: lifecycle_cli.MaxRuntime = None,
    vacuum: lifecycle_cli.VacuumAfter = False,
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
    from chatdb import lifecycle

    duration = lifecycle.parse_duration(older_than, "--older-than")
    grace = lifecycle.parse_duration(deleted_grace, "--deleted-grace")
    limit = lifecycle_cli.optional_duration(max_runtime, "--max-runtime")
    lifecycle_cli.run_command(
        ctx,
        lifecycle_cli.Request("purge", "delete", batch_size, jobs, yes, dry_run, as_json, limit, vacuum),
        lambda engine, count: lifecycle.plan_purge(engine, duration, grace, count=count),
        lifecycle.purge,
        {
            "older_than": duration.text,
            "deleted_grace": grace.text,
            "batch_size": batch_size,
            "jobs": jobs,
            "max_runtime": limit.text if limit else None,
            "vacuum": vacuum,
        },
    )
