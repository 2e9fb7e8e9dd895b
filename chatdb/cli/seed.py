"""``chatdb seed``: fill a database with realistic, deterministic fake chat data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from chatdb.cli.common import confirm, disposing, err, json_fields, out, print_json, progress_bar, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.options import JsonOutput, Yes, option
from chatdb.defaults import DEFAULT_CONVERSATIONS, DEFAULT_DAYS, DEFAULT_MESSAGES, DEFAULT_SEED, DEFAULT_USERS

if TYPE_CHECKING:
    from chatdb import seed as seed_module

app = new_app()

Users = Annotated[int, option("--users", "N", "Total number of users.")]
Conversations = Annotated[int, option("--conversations", "N", "Total number of conversations.")]
Messages = Annotated[
    int, option("--messages", "N", "Total number of messages (at least one per conversation).")
]
Days = Annotated[int, option("--days", "DAYS", "Spread the activity over the last DAYS days.")]
Seed = Annotated[int, option("--seed", "SEED", "Random seed: the same seed and sizes give the same rows.")]
Reset = Annotated[
    bool, typer.Option("--reset", help="First delete everything earlier seeds created (users seed-*).")
]


@contextmanager
def _progress(total: int) -> Iterator[seed_module.Progress | None]:
    """A progress bar with rows/s and ETA on stderr, only when stderr is a terminal."""
    with progress_bar(
        "{task.description:<13}",
        # The count is of every row (users, conversations, messages); the description names
        # the table being copied.
        lambda p: (
            p.TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
            p.TaskProgressColumn(),
            p.TextColumn("{task.fields[rate]}"),
        ),
    ) as bar:
        if bar is None:
            yield None
            return
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
    users: Users = DEFAULT_USERS,
    conversations: Conversations = DEFAULT_CONVERSATIONS,
    messages: Messages = DEFAULT_MESSAGES,
    days: Days = DEFAULT_DAYS,
    seed_value: Seed = DEFAULT_SEED,
    reset: Reset = False,
    yes: Yes = False,
    as_json: JsonOutput = False,
) -> None:
    """Fill the database with realistic, deterministic fake chat data, loaded with COPY.

    Seeded users have ids `seed-<SEED>-<NUMBER>`, so `--reset` deletes exactly them
    and, by cascade, everything of theirs, never a real user's rows. The whole seed is one
    transaction: interrupted, it leaves nothing.

    Example:

        chatdb seed --users 10000 --conversations 50000 --messages 1000000

        chatdb seed --reset --yes --seed 7
    """
    from chatdb import seed as seed_module

    request = seed_module.SeedRequest(users, conversations, messages, days, seed_value)
    request.validate()
    with disposing(open_engine(ctx, "seed")) as engine:
        removed = None
        if reset:
            existing = seed_module.seeded_counts(engine)
            if existing.users:
                if not as_json:
                    err.print(f"--reset deletes {_described(existing)}.")
                confirm("Delete them?", yes=yes, off_terminal="refuse")
                removed = seed_module.reset(engine)
        with _progress(request.rows) as progress:
            result = seed_module.seed(engine, request, progress)
    if as_json:
        print_json(
            "seed", True, **json_fields(result), rows_per_second=round(result.rows_per_second), reset=removed
        )
        return
    if removed is not None:
        out.print(f"Reset: deleted {_described(removed)}.")
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


def _described(counts: seed_module.ResetResult) -> str:
    """``N seeded users, C conversations, M messages``, and the archive's when it holds any."""
    shown = (
        f"{counts.users:,} seeded users, {counts.conversations:,} conversations, {counts.messages:,} messages"
    )
    if counts.archived_conversations or counts.archived_messages:
        shown += (
            f" (and from the archive {counts.archived_conversations:,} conversations,"
            f" {counts.archived_messages:,} messages)"
        )
    return shown
