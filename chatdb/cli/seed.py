"""``chatdb seed``: fill a database with realistic, deterministic fake chat data."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from chatdb import seed as seed_module
from chatdb.cli.common import JsonOutput, Yes, confirm, disposing, err, out, print_json, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app

app = new_app()


@contextmanager
def _progress(total: int) -> Iterator[seed_module.Progress | None]:
    """A progress bar with rows/s and ETA on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description:<13}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    with bar:
        task = bar.add_task("seeding", total=total, rate="")

        def update(phase: str, done: int, phase_total: int) -> None:
            speed = bar.tasks[0].speed
            bar.update(
                task,
                description=phase,
                completed=done if phase != "indexes" else total,
                rate=f"{speed:,.0f} rows/s" if speed else "",
            )

        yield update


@command(app, "seed", database=True)
def seed(
    ctx: typer.Context,
    users: Annotated[
        int, typer.Option("--users", metavar="N", help="Total number of users.")
    ] = seed_module.DEFAULT_USERS,
    conversations: Annotated[
        int, typer.Option("--conversations", metavar="N", help="Total number of conversations.")
    ] = seed_module.DEFAULT_CONVERSATIONS,
    messages: Annotated[
        int,
        typer.Option(
            "--messages", metavar="N", help="Total number of messages (at least one per conversation)."
        ),
    ] = seed_module.DEFAULT_MESSAGES,
    days: Annotated[
        int, typer.Option("--days", metavar="DAYS", help="Spread the activity over the last DAYS days.")
    ] = seed_module.DEFAULT_DAYS,
    seed_value: Annotated[
        int,
        typer.Option(
            "--seed", metavar="SEED", help="Random seed: the same seed and sizes give the same rows."
        ),
    ] = seed_module.DEFAULT_SEED,
    reset: Annotated[
        bool,
        typer.Option("--reset", help="First delete everything earlier seeds created (users seed-*)."),
    ] = False,
    yes: Yes = False,
    as_json: JsonOutput = False,
) -> None:
    """Fill the database with realistic, deterministic fake chat data, loaded with COPY.

    Seeded users have ids starting with `seed-<SEED>-`, so `--reset` deletes exactly them
    and, by cascade, everything of theirs, never a real user's rows. The whole seed is one
    transaction: interrupted, it leaves nothing.

    Example:

        chatdb seed --users 10000 --conversations 50000 --messages 1000000

        chatdb seed --reset --yes --seed 7
    """
    request = seed_module.SeedRequest(users, conversations, messages, days, seed_value)
    request.validate()
    with disposing(open_engine(ctx, "seed")) as engine:
        removed = None
        if reset:
            existing = seed_module.seeded_counts(engine)
            if existing.users:
                if not as_json:
                    err.print(
                        f"--reset deletes {existing.users:,} seeded users with {existing.conversations:,} "
                        f"conversations and {existing.messages:,} messages."
                    )
                confirm("Delete them?", yes=yes, off_terminal="refuse")
                removed = seed_module.reset(engine)
        with _progress(request.rows) as progress:
            result = seed_module.seed(engine, request, progress)
    if as_json:
        print_json(
            "seed",
            True,
            seed=result.seed,
            users=result.users,
            conversations=result.conversations,
            messages=result.messages,
            anchor=result.anchor,
            fast_path=result.fast_path,
            elapsed_seconds=round(result.elapsed, 3),
            rows_per_second=round(result.rows_per_second),
            reset=removed,
        )
        return
    if removed is not None:
        out.print(
            f"Reset: deleted {removed.users:,} seeded users, {removed.conversations:,} conversations, "
            f"{removed.messages:,} messages."
        )
    out.print(
        table(
            f"Seed {result.seed} loaded",
            ["users", "conversations", "messages", "elapsed", "rows/s"],
            [
                (
                    f"{result.users:,}",
                    f"{result.conversations:,}",
                    f"{result.messages:,}",
                    f"{result.elapsed:.1f} s",
                    f"{result.rows_per_second:,.0f}",
                )
            ],
        )
    )
