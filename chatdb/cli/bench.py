"""``chatdb bench``: the application's query patterns under load, against their budgets."""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from chatdb.bench.budgets import DEFAULT_BUDGETS, PATTERNS, format_limit, mix_text
from chatdb.cli.common import check_writable, disposing, out, print_json, progress_bar, write_report
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.findings import write_junit
from chatdb.cli.options import JsonOutput, option, report_file
from chatdb.defaults import DEFAULT_CLIENTS, DEFAULT_MIX, DEFAULT_SECONDS
from chatdb.errors import EXIT_PROBLEM, UsageError

if TYPE_CHECKING:
    from chatdb.bench import model, runner

COMMAND = "bench"

app = new_app()

_BUDGETS_HELP = "; ".join(f"{b.key}={format_limit(b.limit_ms).replace(' ', '')}" for b in DEFAULT_BUDGETS)

Clients = Annotated[int, option("--clients", "N", "Concurrent connections (pgbench clients).", min=1)]
Rate = Annotated[
    float | None,
    option(
        "--rate",
        "TPS",
        "Schedule transactions at this rate and judge every budget there. "
        "Without it, bench finds the capacity: the highest rate at which every budget holds.",
    ),
]
MinCapacity = Annotated[
    float | None, option("--min-capacity", "TPS", "Exit 1 when the capacity is below this rate.")
]
MaxRate = Annotated[float | None, option("--max-rate", "TPS", "The highest rate the capacity search tries.")]
RunDuration = Annotated[
    str, option("--duration", "DURATION", "How long each rate runs (s, m, h, d, w: 60s, 5m, 1h30m).")
]
Mix = Annotated[str, option("--mix", "MIX", f"Patterns and their weights. Patterns: {', '.join(PATTERNS)}.")]
Budget = Annotated[
    list[str] | None,
    option(
        "--budget",
        "PATTERN.METRIC=DURATION",
        f"Override a budget (repeatable). Metrics: pNN (p50, p95, p99.9), max, and history.overhead "
        f"(the soft-delete filter: history's median less history-unfiltered's). Defaults, from the "
        f"specification: {_BUDGETS_HELP}.",
    ),
]
While = Annotated[
    str | None,
    option(
        "--while",
        "COMMAND",
        'Measure again while this chatdb command runs (such as "purge --older-than 90d"); '
        "the budgets apply to that second measurement.",
    ),
]
Cleanup = Annotated[
    bool, typer.Option("--cleanup", help="Only remove the rows that bench runs killed earlier left behind.")
]
Junit = Annotated[Path | None, report_file("--junit", "Also write a JUnit XML report (a case per budget).")]
Html = Annotated[
    Path | None, report_file("--html", "Also write an HTML report with a latency CDF per pattern.")
]
LogDir = Annotated[
    Path | None,
    option(
        "--log-dir",
        "FOLDER",
        "Keep pgbench's scripts and per-transaction logs in FOLDER, to check the figures.",
        file_okay=False,
    ),
]


@command(app, COMMAND, database=True)
def bench_command(
    ctx: typer.Context,
    clients: Clients = DEFAULT_CLIENTS,
    rate: Rate = None,
    min_capacity: MinCapacity = None,
    max_rate: MaxRate = None,
    duration: RunDuration = f"{DEFAULT_SECONDS}s",
    mix: Mix = mix_text(DEFAULT_MIX),
    budget: Budget = None,
    while_command: While = None,
    cleanup: Cleanup = False,
    junit: Junit = None,
    html: Html = None,
    log_dir: LogDir = None,
    as_json: JsonOutput = False,
) -> None:
    """Prove on a live database that the application's queries meet their latency budgets
    under concurrent load, also while archive or purge runs.

    pgbench drives the patterns of chatdb/patterns.py (history: a conversation's 50
    newest messages; recent: a user's 20 most recent conversations; insert: add a message
    and bump its conversation, one transaction; message: one message by id;
    history-unfiltered: history without the soft-delete filter) as an open model:
    transactions are scheduled at a rate and latency counts from each one's scheduled
    start. Reads ask for conversations, users and messages of the database itself, heavy
    users more often; writes go only to users that bench creates (bench-*) and removes at
    the end (--cleanup removes those of a run that was killed).

    Exit code 0: every budget held; 1: a budget was missed, the capacity is below
    --min-capacity, or the --while command failed; 2: bad input.

    Example:

        chatdb bench --clients 100 --rate 1000 --duration 60s

        chatdb bench --min-capacity 500 --junit bench.xml --html bench.html

        chatdb bench --rate 500 --while "purge --older-than 90d"
    """
    from chatdb import lifecycle
    from chatdb.bench import budgets, report, rows, runner
    from chatdb.bench.model import BenchRequest
    from chatdb.cli.bench_render import removed_line, render

    if cleanup:
        with disposing(open_engine(ctx, COMMAND)) as engine:
            removed = rows.cleanup(engine)
        if as_json:
            print_json(COMMAND, True, cleanup=_removed(removed), running=removed.running)
        else:
            out.print(removed_line(removed, "Removed") or "No rows of killed bench runs to remove.")
            if removed.running:
                out.print(f"Left alone the rows of {removed.running} bench run(s) still going.")
        return
    request = BenchRequest(
        clients=clients,
        rate=rate,
        min_capacity=min_capacity,
        max_rate=max_rate,
        seconds=lifecycle.parse_duration(duration, "--duration", such_as="60s or 5m").seconds,
        mix=budgets.parse_mix(mix),
        budgets=tuple(budgets.parse_budget(raw) for raw in budget or ()),
        while_command=_while(ctx, while_command) if while_command is not None else None,
        log_dir=log_dir,
    )
    request.validate()
    for name, path in (("--junit", junit), ("--html", html)):
        if path is not None:
            check_writable(path, name)
    with (
        disposing(open_engine(ctx, COMMAND)) as engine,
        _progress() as progress,
    ):
        result = runner.run(engine, request, progress)
    if junit is not None:
        write_junit(report.junit(result), junit)
    if html is not None:
        write_report(html, "HTML report", lambda path: path.write_text(report.page(result), encoding="utf-8"))
    if as_json:
        print_json(COMMAND, result.ok, **_json(result))
    else:
        render(result)
    if not result.ok:
        raise typer.Exit(EXIT_PROBLEM)


def _while(ctx: typer.Context, raw: str) -> tuple[str, ...]:
    """The --while command: a chatdb command and its arguments, as a shell would split them.
    A refusal shows it with every password masked."""
    from chatdb.db import mask_argument, mask_text

    try:
        argv = shlex.split(raw)
    except ValueError as exc:
        raise UsageError(f"invalid --while {mask_text(raw)!r}: {exc}") from None
    if not argv:
        raise UsageError('--while needs a chatdb command, such as "purge --older-than 90d"')
    from chatdb.cli.root import COMMANDS

    known = {entry.name for entry in COMMANDS}
    if argv[0] in (COMMAND, "chatdb") or argv[0] not in known:
        choices = ", ".join(sorted(known - {COMMAND}))
        shown = shlex.join(mask_argument(argument) for argument in argv)
        raise UsageError(f"invalid --while {shown!r}: not a chatdb command to run beside bench ({choices})")
    return tuple(argv)


@contextmanager
def _progress() -> Iterator[runner.Progress | None]:
    """A bar with the time left of each run, on stderr when it is a terminal."""
    with progress_bar("{task.description}", lambda p: (p.TimeElapsedColumn(), p.TextColumn("left"))) as bar:
        if bar is None:
            yield None
            return
        tasks: dict[str, Any] = {}

        def update(label: str, elapsed: float, total: float | None) -> None:
            if label not in tasks:
                for task in tasks.values():
                    bar.update(task, visible=False)
                tasks[label] = bar.add_task(escape(label), total=total)
            bar.update(tasks[label], completed=min(elapsed, total) if total else elapsed)

        yield update


# --- JSON ------------------------------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    """Milliseconds to the microsecond. A percentile that fell on a skipped transaction
    (later than the latency limit) has no value: null, with ``skipped`` counting them."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


def _removed(removed: model.Removed) -> dict[str, int]:
    return {
        "runs": removed.runs,
        "users": removed.users,
        "conversations": removed.conversations,
        "messages": removed.messages,
    }


def _json(result: model.BenchResult) -> dict[str, Any]:
    request = result.request
    alone = result.phases[0]
    phases = []
    for phase in result.phases:
        patterns = []
        for p in phase.patterns:
            entry = {
                "pattern": p.pattern,
                "transactions": p.transactions,
                "tps": round(p.tps, 3),
                "p50_ms": _ms(p.p50_ms),
                "p95_ms": _ms(p.p95_ms),
                "p99_ms": _ms(p.p99_ms),
                "max_ms": _ms(p.max_ms),
                "failures": p.failures,
                "skipped": p.skipped,
                "budgets": [
                    {
                        "metric": r.metric,
                        "limit_ms": r.limit_ms,
                        "value_ms": _ms(r.value_ms),
                        "status": r.status,
                    }
                    for r in p.budgets
                ],
                "histogram": [{"le_ms": b.le_ms, "count": b.count} for b in p.histogram],
            }
            if phase is not alone:
                before = next(q for q in alone.patterns if q.pattern == p.pattern)
                entry["shift_p95_ms"] = _shift(before.p95_ms, p.p95_ms)
                entry["shift_p99_ms"] = _shift(before.p99_ms, p.p99_ms)
            patterns.append(entry)
        command = None
        if phase.command is not None:
            c = phase.command
            command = {
                "line": shlex.join(c.shown),
                "exit_code": c.exit_code,
                "seconds": round(c.seconds, 3),
                "stdout": c.stdout,
                "stderr": c.stderr,
            }
        phases.append(
            {
                "name": phase.name,
                "command": command,
                "judged": phase is result.judged,
                "rate_tps": phase.rate_tps,
                "seconds": round(phase.seconds, 3),
                "tps": round(phase.tps, 3),
                "errors": phase.errors,
                "log": str(phase.log) if request.log_dir is not None and phase.log else None,
                "patterns": patterns,
            }
        )
    return {
        "capacity_tps": result.capacity_tps,
        "capacity_capped": result.capacity_capped,
        "rate_tps": result.rate_tps,
        "min_capacity_tps": request.min_capacity,
        "max_rate_tps": request.max_rate,
        "clients": request.clients,
        "duration_seconds": request.seconds,
        "mix": result.mix,
        "left_out": [{"pattern": name, "reason": reason} for name, reason in result.left_out.items()],
        "key_cost_ms": _ms(result.key_cost_ms),
        "pgbench": result.pgbench,
        "steps": [
            {"rate_tps": s.rate_tps, "ok": s.ok, "tps": round(s.tps, 3), "missed": s.missed}
            for s in result.steps
        ],
        "phases": phases,
        "bench_rows_removed": _removed(result.removed),
        "leftovers_removed": _removed(result.leftovers),
    }


def _shift(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return _ms(after - before)
