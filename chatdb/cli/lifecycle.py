"""What ``chatdb archive`` (``chatdb/cli/archive.py``), ``chatdb archive restore`` and
``chatdb purge`` (``chatdb/cli/purge.py``) share: their options, what signals do during a
run, the plan, the question, the run in batches and its summary."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from chatdb.cli.boundary import Terminated, TerminatedRead, ignore_signals_to_the_end
from chatdb.cli.common import confirm, disposing, err, out, print_json, progress_bar, stdin_is_terminal, table
from chatdb.cli.connect import open_engine
from chatdb.cli.options import option
from chatdb.defaults import MAX_JOBS
from chatdb.errors import EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_TERMINATED

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from chatdb import lifecycle

BatchSize = Annotated[
    int,
    option(
        "--batch-size",
        "N",
        "Most conversations per batch (one short transaction each); "
        "batches shrink on their own to stay short.",
        min=1,
    ),
]
_JOBS_HELP = "Batches in flight at once, each in its own short transaction on its own connection."
Jobs = Annotated[int, option("--jobs", "N", _JOBS_HELP, min=1, max=MAX_JOBS)]
ArchiveJobs = Annotated[
    int,
    option("--jobs", "N", f"{_JOBS_HELP[:-1]} (an --export runs one at a time).", min=1, max=MAX_JOBS),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Change nothing; report exactly what would change.")]
VacuumAfter = Annotated[
    bool,
    typer.Option(
        "--vacuum",
        help="After the last batch, VACUUM (ANALYZE) the tables the run changed that the role "
        "may vacuum, and name the others (it blocks neither reads nor writes; Ctrl-C stops it).",
    ),
]
MaxRuntime = Annotated[
    str | None,
    option(
        "--max-runtime",
        "DURATION",
        "Stop cleanly after the batch in flight once this much time has passed (e.g. 30m).",
    ),
]

_PAST = {"move": "moved", "delete": "deleted", "restore": "restored"}
#: The exit code of a run that stopped before the end, by why: a signal's, or 1 when the
#: rows left stayed locked by other sessions (``lifecycle.LOCKED``).
_STOP_EXIT = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED, "locked": EXIT_PROBLEM}
#: What the summary says of a stop, beside its reason.
_STOP_SAYS = {"locked": "other sessions held the rows left"}


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """A count with its noun: "1 batch", "2 batches", "1,000 conversations"."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


class Signals:
    """What Ctrl-C (SIGINT) and SIGTERM do, from the start of a lifecycle command to its end.

    Before the run (planning, counting, the question) they stop at once: a read in flight
    is cancelled in the server. During the run the first asks it to stop after the batch
    in flight, and a second stops at once (that batch rolls back, unless its COMMIT was on
    its way); a first one that comes after the last batch still stops the run, whose
    outcome is then ``interrupted``. From the moment the run records its outcome in its
    audit row (``recording``), the run is over: a signal changes nothing, neither the
    summary nor the exit code, which are the run's, up to the process's exit (but for
    --vacuum's VACUUM, which a signal stops)."""

    def __init__(self) -> None:
        self.stage = "before"  # "before", "running", "recording", "vacuum" or "over"
        self.requested: str | None = None

    def handle(self, signum: int, frame: object) -> None:
        if self.stage in ("recording", "over"):
            return
        if self.stage in ("before", "vacuum"):  # a read or VACUUM in flight is cancelled in the server
            raise KeyboardInterrupt if signum == signal.SIGINT else TerminatedRead()
        if self.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        self.requested = "interrupted" if signum == signal.SIGINT else "terminated"
        err.print(f"chatdb: {self.requested}; stopping after the current batch (again to stop now)")

    def stop_requested(self) -> str | None:
        return self.requested

    def recording(self) -> str | None:
        """The run is about to record its outcome: the stop asked for until now, if any.
        A signal handled from here on changes nothing. (Handlers run in the main thread,
        between two of its steps, as this does: a signal is handled either before the
        stage changes, and its stop is returned, or after, and ignored.)"""
        self.stage = "recording"
        return self.requested

    def run_over(self) -> None:
        self.stage = "over"


@contextmanager
def signals() -> Iterator[Signals]:
    """Signals handled as ``Signals`` says while the command runs. Once its run is over,
    they stay ignored to the process's exit (``ignore_signals_to_the_end``); otherwise the
    handlers found are put back."""
    state = Signals()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, state.handle)
    try:
        yield state
    finally:
        if state.stage != "over" or not ignore_signals_to_the_end():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def _progress(plan: lifecycle.Plan) -> Iterator[Callable[[lifecycle.Tally], None] | None]:
    """A progress bar with ETA on stderr, only when stderr is a terminal and the plan
    was counted."""
    if plan.counts is None or not plan.counts.rows:
        yield None
        return
    total = plan.counts.rows
    with progress_bar(plan.command, lambda p: (p.MofNCompleteColumn(), p.TextColumn("rows"))) as bar:
        if bar is None:
            yield None
            return
        task = bar.add_task(plan.command, total=total)
        yield lambda done: bar.update(task, completed=done.rows)


def optional_duration(raw: str | None, option: str) -> lifecycle.Duration | None:
    from chatdb.lifecycle import parse_duration

    return None if raw is None else parse_duration(raw, option)


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


@dataclass(frozen=True)
class Request:
    """How the user asked archive, purge or restore to run: what their options share."""

    command: str  # as the user typed it: "archive", "purge", "archive restore"
    verb: str  # what a batch does to a row: "move", "delete", "restore"
    batch_size: int
    jobs: int
    yes: bool = False
    dry_run: bool = False
    as_json: bool = False
    max_runtime: lifecycle.Duration | None = None
    vacuum: bool = False

    def counts(self) -> bool:
        """Counting is exact but costs a scan: only for a dry run, a question or a progress bar."""
        return self.dry_run or (stdin_is_terminal() and not self.yes) or sys.stderr.isatty()


def run_command(
    ctx: typer.Context,
    request: Request,
    plan: Callable[[Engine, bool], lifecycle.Plan],
    run: Callable[[Engine, lifecycle.Plan, lifecycle.RunOptions], lifecycle.RunResult],
    arguments: dict[str, Any],
) -> None:
    """A lifecycle command from its plan to its summary, with what signals do all along:
    ``plan(engine, count)`` and ``run(engine, plan, options)``; ``arguments`` are what its
    audit row records."""
    from chatdb import lifecycle

    with signals() as stops, disposing(open_engine(ctx, request.command)) as engine:
        planned = plan(engine, request.counts())
        _execute(
            planned,
            lambda options: run(engine, planned, options),
            stops,
            request,
            arguments,
            vacuum=(lambda result: lifecycle.vacuum(engine, result)) if request.vacuum else None,
        )


def _execute(
    plan: lifecycle.Plan,
    run: Callable[[lifecycle.RunOptions], lifecycle.RunResult],
    signals: Signals,
    request: Request,
    arguments: dict[str, Any],
    vacuum: Callable[[lifecycle.RunResult], None] | None = None,
) -> None:
    """Show the plan, ask on a terminal, run in batches, VACUUM when asked, and render the
    summary."""
    from chatdb import lifecycle

    verb, yes, as_json = request.verb, request.yes, request.as_json
    if request.dry_run:
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
            batch_size=request.batch_size,
            jobs=request.jobs,
            max_runtime=request.max_runtime,
            should_stop=signals.stop_requested,
            progress=progress,
            arguments=arguments,
            recording=signals.recording,
            recorded=signals.run_over,
        )
        signals.stage = "running"
        try:
            result = run(options)
        except BaseException:
            if signals.stage in ("running", "recording"):  # it ended without recording its outcome
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
    from chatdb.lifecycle import SLOW_TRANSACTION_SECONDS

    if as_json:
        print_json(
            result.command,
            result.outcome == "succeeded" and result.stopped_by not in _STOP_EXIT,
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
        f"longest transaction {result.longest_transaction_seconds * 1000:.0f} ms, "
        f"{result.slow_transactions:,} over {SLOW_TRANSACTION_SECONDS * 1000:.0f} ms"
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
        why = f": {_STOP_SAYS[result.stopped_by]}" if result.stopped_by in _STOP_SAYS else ""
        out.print(
            f"[yellow]Stopped ({result.stopped_by}){why}.[/yellow]{left} run the command again to continue."
        )
    _render_vacuum(result.vacuum)


def _render_vacuum(vacuum: lifecycle.Vacuum) -> None:
    """Whether the run left tables needing VACUUM, and what --vacuum did: done on which
    tables, and which it skipped because the role may not vacuum them."""
    if vacuum.vacuumed:
        out.print(f"VACUUM (ANALYZE) done on {', '.join(vacuum.vacuumed)}.")
    for why, skipped in _grouped(vacuum.skipped).items():
        out.print(f"[yellow]VACUUM (ANALYZE) skipped on {', '.join(skipped)}:[/yellow] {escape(why)}.")
    left = vacuum.left()
    if vacuum.stopped_by:
        out.print(
            f"[yellow]VACUUM stopped ({vacuum.stopped_by}).[/yellow] Autovacuum will get to the tables"
            " left, or run `chatdb doctor` to see them."
        )
    elif left:
        tables = ", ".join(f"{table} ({_n(rows, 'dead row')})" for table, rows in left.items())
        mine = [table for table in left if table not in vacuum.run_by]
        fixes = [f"run {escape(vacuum.fix(mine))} or give --vacuum next time"] if mine else []
        for who, theirs in _grouped({t: w for t, w in vacuum.run_by.items() if t in left}).items():
            fixes.append(f"{escape(vacuum.fix(theirs))} must be run by {escape(who)}")
        out.print(
            f"[yellow]Left tables needing VACUUM:[/yellow] {tables}. Autovacuum gets to them in time;"
            f" to do it now, {', and '.join(fixes)}."
        )


def _grouped(by_table: dict[str, str]) -> dict[str, list[str]]:
    """{table: value} as {value: [tables]}, in the tables' order."""
    grouped: dict[str, list[str]] = {}
    for name, value in by_table.items():
        grouped.setdefault(value, []).append(name)
    return grouped
