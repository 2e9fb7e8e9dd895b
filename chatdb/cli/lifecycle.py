"""``chatdb archive``, ``chatdb archive restore`` and ``chatdb purge``."""

from __future__ import annotations

import re
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from chatdb import lifecycle
from chatdb.cli.common import (
    ConnectTimeout,
    DatabaseUrl,
    JsonOutput,
    Terminated,
    TerminatedRead,
    Yes,
    adopt_group_options,
    confirm,
    disposing,
    err,
    handle_errors,
    open_engine,
    out,
    print_json,
    stdin_is_terminal,
    table,
)
from chatdb.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, UsageError

BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        help="Most conversations per batch (one short transaction each); "
        "batches shrink on their own to stay short.",
        min=1,
    ),
]
_JOBS_HELP = "Batches in flight at once, each in its own short transaction on its own connection."
Jobs = Annotated[int, typer.Option("--jobs", help=_JOBS_HELP, min=1, max=lifecycle.MAX_JOBS)]
ArchiveJobs = Annotated[
    int,
    typer.Option(
        "--jobs", help=f"{_JOBS_HELP[:-1]} (an --export runs one at a time).", min=1, max=lifecycle.MAX_JOBS
    ),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Change nothing; report exactly what would change.")]
VacuumAfter = Annotated[
    bool,
    typer.Option(
        "--vacuum",
        help="After the last batch, VACUUM (ANALYZE) the tables the run changed "
        "(it blocks neither reads nor writes; Ctrl-C stops it).",
    ),
]
MaxRuntime = Annotated[
    str | None,
    typer.Option(
        "--max-runtime",
        help="Stop cleanly after the batch in flight once this much time has passed (e.g. 30m).",
        show_default=False,
    ),
]

_PAST = {"move": "moved", "delete": "deleted", "restore": "restored"}
_STOP_EXIT = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}
# A conversation id as uuid.UUID reads it, in ASCII hex only (UUID() also takes other
# scripts' digits, underscores and blanks).
_UUID = re.compile(
    r"(?:urn:uuid:)?\{?[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}\}?", re.ASCII | re.IGNORECASE
)


# --- shared by the three commands -----------------------------------------------------------


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """A count with its noun: "1 batch", "2 batches", "1,000 conversations"."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


class _Signals:
    """What Ctrl-C (SIGINT) and SIGTERM do, from the start of a lifecycle command to its end.

    Before the run (planning, counting, the question) they stop at once: a read in flight
    is cancelled in the server. During the run the first asks it to stop after the batch
    in flight, and a second stops at once (that batch rolls back, unless its COMMIT was on
    its way). Once the run's outcome is committed to its audit row, the run is over: a
    signal changes nothing, neither the summary nor the exit code, which are the run's."""

    def __init__(self) -> None:
        self.stage = "before"  # "before", "running" or "over"
        self.requested: str | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.stage == "over":
            return
        if self.stage in ("before", "vacuum"):  # a read or VACUUM in flight is cancelled in the server
            raise KeyboardInterrupt if signum == signal.SIGINT else TerminatedRead()
        if self.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.requested = "interrupted" if signum == signal.SIGINT else "terminated"
        err.print(f"chatdb: {self.requested}; stopping after the current batch (again to stop now)")

    def stop_requested(self) -> str | None:
        return self.requested

    def run_over(self) -> None:
        self.stage = "over"


@contextmanager
def _signals() -> Iterator[_Signals]:
    state = _Signals()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, state.handle)
    try:
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _progress(plan: lifecycle.Plan) -> Iterator[Callable[[lifecycle.Tally], None] | None]:
    """A progress bar with ETA on stderr, only when stderr is a terminal and the plan
    was counted."""
    if not sys.stderr.isatty() or plan.counts is None or not plan.counts.rows:
        yield None
        return
    bar = Progress(
        TextColumn(f"[bold]{plan.command}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    with bar:
        task = bar.add_task(plan.command, total=plan.counts.rows)
        yield lambda done: bar.update(task, completed=done.rows)


def _duration(raw: str | None, option: str) -> lifecycle.Duration | None:
    return None if raw is None else lifecycle.parse_duration(raw, option)


def _tally_rows(title: str, tally: lifecycle.Tally) -> list[tuple[str, str, str]]:
    return [
        (title, "conversations", f"{tally.conversations:,}"),
        (title, "messages", f"{tally.messages:,}"),
        (f"{title} (archive)", "conversations", f"{tally.archive_conversations:,}"),
        (f"{title} (archive)", "messages", f"{tally.archive_messages:,}"),
    ]


def _shown(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The hot rows always; the archive rows when there are any."""
    return [row for row in rows if row[2] != "0" or not row[0].endswith("(archive)")]


def _cutoffs(plan: lifecycle.Plan) -> str:
    parts = []
    if plan.cutoff is not None:
        parts.append(f"idle since before {plan.cutoff:%Y-%m-%d %H:%M:%S%z}")
    if plan.deleted_cutoff is not None:
        parts.append(f"soft-deleted before {plan.deleted_cutoff:%Y-%m-%d %H:%M:%S%z}")
    return ", ".join(parts)


def _show_plan(plan: lifecycle.Plan, verb: str, to_stderr: bool) -> None:
    console = err if to_stderr else out
    assert plan.counts is not None
    if plan.cutoff is not None:
        console.print(f"Cutoff (database clock): {_cutoffs(plan)}.")
    console.print(table(None, ["", "rows", ">count"], _shown(_tally_rows(verb, plan.counts))))


def _counts(plan: lifecycle.Plan, tally: lifecycle.Tally) -> dict[str, int]:
    """Counts for --json. A restore takes rows from the archive and puts them back in the
    hot tables: its counts are the conversations and messages restored."""
    if plan.command == "archive restore":
        return {"conversations": tally.archive_conversations, "messages": tally.archive_messages}
    return tally.as_dict()


def _json_plan(plan: lifecycle.Plan) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "cutoff": plan.cutoff,
        "deleted_cutoff": plan.deleted_cutoff,
        "planned": _counts(plan, plan.counts) if plan.counts else None,
    }
    if plan.conversation_ids:
        shown["already_hot"] = [str(i) for i in plan.already_hot]
    return shown


def _execute(
    plan: lifecycle.Plan,
    run: Callable[[lifecycle.RunOptions], lifecycle.RunResult],
    signals: _Signals,
    *,
    verb: str,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    batch_size: int,
    jobs: int,
    max_runtime: lifecycle.Duration | None,
    arguments: dict[str, Any],
    vacuum: Callable[[lifecycle.RunResult], None] | None = None,
) -> None:
    """Show the plan, ask on a terminal, run in batches, VACUUM when asked, and render the
    summary."""
    if dry_run:
        if as_json:
            print_json(plan.command, True, dry_run=True, **_json_plan(plan))
        else:
            _show_plan(plan, f"would {verb}", to_stderr=False)
            out.print("Dry run: nothing was changed.")
        return
    if plan.counts is not None and stdin_is_terminal() and not yes:
        _show_plan(plan, f"will {verb}", to_stderr=True)
        if not plan.counts.rows:
            err.print("Nothing to do.")
    nothing_to_do = plan.counts is not None and not plan.counts.rows
    confirm(f"{verb.capitalize()} these rows?", yes=yes or nothing_to_do, off_terminal="proceed")
    with _progress(plan) as progress:
        options = lifecycle.RunOptions(
            batch_size=batch_size,
            jobs=jobs,
            max_runtime=max_runtime,
            should_stop=signals.stop_requested,
            progress=progress,
            arguments=arguments,
            recorded=signals.run_over,
        )
        signals.stage = "running"
        try:
            result = run(options)
        except BaseException:
            if signals.stage == "running":  # it ended before recording its outcome
                signals.stage = "before"
            raise
    signals.run_over()  # also when its outcome could not be recorded
    if vacuum is not None and result.complete:
        signals.stage = "vacuum"
        try:
            vacuum(result)
        except (KeyboardInterrupt, Terminated) as stop:
            result.vacuum.stopped_by = "terminated" if isinstance(stop, Terminated) else "interrupted"
        finally:
            signals.run_over()
    _render(result, verb, as_json)
    stopped = result.stopped_by or result.vacuum.stopped_by
    if stopped in _STOP_EXIT:
        raise typer.Exit(_STOP_EXIT[stopped])


def _render(result: lifecycle.RunResult, verb: str, as_json: bool) -> None:
    if as_json:
        print_json(
            result.command,
            result.outcome == "succeeded",
            run_id=result.run_id,
            outcome=result.outcome,
            complete=result.complete,
            stopped_by=result.stopped_by,
            **_json_plan(result.plan),
            done=_counts(result.plan, result.done),
            remaining=result.remaining.as_dict() if result.remaining else None,
            exported=result.exported,
            batches=result.batches,
            jobs=result.jobs,
            retries=result.retries,
            longest_transaction_seconds=round(result.longest_transaction_seconds, 4),
            slow_transactions=result.slow_transactions,
            elapsed_seconds=round(result.elapsed_seconds, 3),
            took_over=result.took_over,
            vacuum=result.vacuum,
        )
        return
    for run_id in result.took_over:
        err.print(f"Run {run_id} had ended without finishing; marked interrupted.")
    title = f"Run {result.run_id}: {result.command}"
    if result.plan.cutoff is not None:
        title += f", {_cutoffs(result.plan)}"
    if verb == "restore":  # from the archive to the hot tables: one count of each
        done = result.done
        if result.plan.user_id is not None and not done.archive_conversations and result.complete:
            user = escape(repr(result.plan.user_id))
            out.print(f"Nothing to restore: user {user} has no conversations in the archive.")
            return
        rows = [
            ("restored", "conversations", f"{done.archive_conversations:,}"),
            ("restored", "messages", f"{done.archive_messages:,}"),
        ]
    else:
        rows = _shown(_tally_rows(_PAST[verb], result.done))
    out.print(table(title, ["", "rows", ">count"], rows))
    line = (
        f"{_n(result.batches, 'batch', 'batches')} in {result.elapsed_seconds:.1f} s, "
        f"longest transaction {result.longest_transaction_seconds * 1000:.0f} ms"
    )
    if result.exported:
        line += f"; {_n(result.exported, 'conversation')} exported"
    if result.plan.already_hot:
        hot = len(result.plan.already_hot)
        were = "was" if hot == 1 else "were"
        line += f"; {hot:,} of the given conversations {were} already in the hot tables"
    out.print(line + ".")
    if not result.complete:
        left = ""
        if result.remaining is not None:
            left_over = result.remaining
            conversations = left_over.conversations + left_over.archive_conversations
            messages = left_over.messages + left_over.archive_messages
            left = f" {_n(conversations, 'conversation')} and {_n(messages, 'message')} are left;"
        out.print(f"[yellow]Stopped ({result.stopped_by}).[/yellow]{left} run the command again to continue.")
    _render_vacuum(result.vacuum)


def _render_vacuum(vacuum: lifecycle.Vacuum) -> None:
    """Whether the run left tables needing VACUUM, and what --vacuum did."""
    if vacuum.vacuumed:
        out.print(f"VACUUM (ANALYZE) done on {', '.join(vacuum.vacuumed)}.")
    if vacuum.stopped_by:
        out.print(
            f"[yellow]VACUUM stopped ({vacuum.stopped_by}).[/yellow] Autovacuum will get to the tables"
            " left, or run `chatdb doctor` to see them."
        )
    left = vacuum.left()
    if left and not vacuum.stopped_by:
        tables = ", ".join(f"{table} ({_n(rows, 'dead row')})" for table, rows in left.items())
        out.print(
            f"[yellow]Left tables needing VACUUM:[/yellow] {tables}. Autovacuum gets to them in time;"
            f" to do it now, run {escape(vacuum.fix())} or give --vacuum next time."
        )


def _needs_counts(dry_run: bool, yes: bool) -> bool:
    """Counting is exact but costs a scan: only for a dry run, a question or a progress bar."""
    return dry_run or (stdin_is_terminal() and not yes) or sys.stderr.isatty()


# --- archive ----------------------------------------------------------------------------------

archive_app = typer.Typer(no_args_is_help=False)


@archive_app.callback(invoke_without_command=True)
@handle_errors
def archive(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
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
    database_url: DatabaseUrl = None,
    connect_timeout: ConnectTimeout = None,
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
        adopt_group_options(ctx, database_url, connect_timeout)
        if older_than is not None or dry_run or export is not None or as_json or vacuum:
            raise UsageError(
                f"archive's options go after the subcommand (`chatdb archive {ctx.invoked_subcommand} ...`)"
            )
        return
    if older_than is None:
        raise UsageError("--older-than is required (for example `chatdb archive --older-than 180d`)")
    duration = lifecycle.parse_duration(older_than, "--older-than")
    limit = _duration(max_runtime, "--max-runtime")
    if export is not None:
        lifecycle.check_export(export)  # before anything starts: a FIFO would block the run
    with (
        _signals() as signals,
        disposing(open_engine(ctx, "archive", database_url, connect_timeout)) as engine,
    ):
        plan = lifecycle.plan_archive(engine, duration, count=_needs_counts(dry_run, yes))
        _execute(
            plan,
            lambda options: lifecycle.archive(engine, plan, options, export),
            signals,
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


@archive_app.command("restore")
@handle_errors
def restore(
    ctx: typer.Context,
    conversation: Annotated[
        list[str] | None,
        typer.Option(
            "--conversation", help="An archived conversation's id (repeatable).", show_default=False
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Restore every archived conversation of this user.")
    ] = None,
    batch_size: BatchSize = lifecycle.DEFAULT_BATCH_SIZE,
    jobs: Jobs = lifecycle.DEFAULT_JOBS,
    as_json: JsonOutput = False,
    database_url: DatabaseUrl = None,
    connect_timeout: ConnectTimeout = None,
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
        _signals() as signals,
        disposing(open_engine(ctx, "archive restore", database_url, connect_timeout)) as engine,
    ):
        plan = lifecycle.plan_restore(engine, ids, user)
        _execute(
            plan,
            lambda options: lifecycle.restore(engine, plan, options),
            signals,
            verb="restore",
            yes=True,
            dry_run=False,
            as_json=as_json,
            batch_size=batch_size,
            jobs=jobs,
            max_runtime=None,
            arguments={"conversations": [str(i) for i in ids], "user": user, "batch_size": batch_size},
        )


# --- purge ------------------------------------------------------------------------------------


@handle_errors
def purge(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Delete conversations idle longer than this, hot and archived (e.g. 365d).",
            show_default=False,
        ),
    ],
    deleted_grace: Annotated[
        str,
        typer.Option(
            "--deleted-grace",
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
    database_url: DatabaseUrl = None,
    connect_timeout: ConnectTimeout = None,
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
    limit = _duration(max_runtime, "--max-runtime")
    with _signals() as signals, disposing(open_engine(ctx, "purge", database_url, connect_timeout)) as engine:
        plan = lifecycle.plan_purge(engine, duration, grace, count=_needs_counts(dry_run, yes))
        _execute(
            plan,
            lambda options: lifecycle.purge(engine, plan, options),
            signals,
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
