"""What ``chatdb bench`` shows people: the figures of each phase, the capacity search, the
shift during the --while command, a latency chart and the verdict."""

from __future__ import annotations

import math
import shlex

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from chatdb.bench import model, runner, stats
from chatdb.bench.workload import OVERHEAD, format_limit, format_ms
from chatdb.cli.common import out, table

# --- people ----------------------------------------------------------------------------------


def render(result: model.BenchResult) -> None:
    request = result.request
    out.print(
        f"chatdb bench: {request.clients} clients, {request.seconds} s per run, open model "
        "(latency from each transaction's scheduled start), mix "
        + ", ".join(f"{name}={weight}" for name, weight in result.mix.items()),
        markup=False,
    )
    for name, reason in result.left_out.items():
        out.print(Text(f"{name} left out: {reason}", style="yellow"))
    if result.leftovers.runs:
        out.print(removed_line(result.leftovers, "Removed what killed bench runs left behind:"), markup=False)
    if result.key_cost_ms is not None:
        out.print(
            f"Keys: drawn from the ~{result.messages_estimate:,} messages of the database; carrying one "
            f"costs {format_ms(result.key_cost_ms)} per transaction.",
            markup=False,
        )
        if result.key_cost_ms >= runner.KEY_COST_NOTICEABLE_MS:
            out.print(
                Text(
                    f"Note: more than {runner.KEY_COST_NOTICEABLE_MS} ms; every read's figures include it.",
                    style="yellow",
                )
            )
    if result.steps:
        _print_table(
            table(
                "Capacity search",
                [">rate (tps)", ">achieved", "every budget", "missed"],
                (
                    (
                        f"{s.rate_tps:,.6g}",
                        f"{s.tps:,.1f}",
                        "[green]held[/green]" if s.ok else "[red]no[/red]",
                        escape(", ".join(s.missed)),
                    )
                    for s in result.steps
                ),
            )
        )
    alone = result.phases[0]
    _print_table(
        _figures(
            alone,
            f"{alone.rate_tps:,.6g} tps scheduled, {alone.tps:,.1f} achieved",
            judged=alone is result.judged,
        )
    )
    if len(result.phases) > 1:
        during = result.phases[1]
        _print_table(_comparison(alone, during))
        _render_command(during)
    _print_table(_chart(result))
    for phase in result.phases:
        for line in phase.errors[:3]:
            out.print(Text(f"pgbench: {line}", style="red"))
    removed = removed_line(result.removed, "Removed bench's rows:")
    if removed:
        out.print(removed, markup=False)
    out.print(_verdict(result))


def _print_table(rendered: Table) -> None:
    """Names and figures keep their width where the terminal allows: the last column (the
    verdicts) wraps first. In a CI log or a file, which have no width, each row stays on
    one line."""
    for column in rendered.columns[:-1]:
        cells = [cell for cell in column.cells if isinstance(cell, str)]
        column.min_width = max((Text.from_markup(cell).cell_len for cell in cells), default=0)
    if not out.is_terminal:
        rendered.width = Measurement.get(out, out.options.update_width(1000), rendered).maximum
    out.print(rendered)


def _figures(phase: model.Phase, title: str, *, judged: bool) -> Table:
    rows = []
    for p in phase.patterns:
        rows.append(
            (
                p.pattern,
                f"{p.transactions:,}",
                f"{p.tps:,.1f}",
                format_ms(p.p50_ms),
                format_ms(p.p95_ms),
                format_ms(p.p99_ms),
                format_ms(p.max_ms),
                f"{p.failures + p.skipped:,}",
                _verdicts(p) if judged else escape(", ".join(r.budget.describe() for r in p.budgets)),
            )
        )
    return table(
        title,
        ["pattern", ">transactions", ">tps", ">p50", ">p95", ">p99", ">max", ">failed/late", "budgets"],
        rows,
    )


def _verdicts(p: stats.PatternFigures) -> str:
    parts = []
    for r in p.budgets:
        shown = format_ms(r.value_ms) if r.metric == OVERHEAD else ""
        mark = {"ok": "[green]ok[/green]", "fail": "[red]missed[/red]"}.get(r.status, "[red]no data[/red]")
        parts.append(f"{escape(r.budget.describe())}{' (' + shown + ')' if shown else ''} {mark}")
    if p.failures:
        parts.append(f"[red]{p.failures:,} failed[/red]")
    return "; ".join(parts) if parts else "-"


def _comparison(alone: model.Phase, during: model.Phase) -> Table:
    command = " ".join(during.command.shown) if during.command else "?"
    rows = []
    for p in during.patterns:
        before = next(q for q in alone.patterns if q.pattern == p.pattern)
        rows.append(
            (
                p.pattern,
                f"{p.transactions:,}",
                format_ms(before.p95_ms),
                format_ms(p.p95_ms),
                _signed(before.p95_ms, p.p95_ms),
                format_ms(before.p99_ms),
                format_ms(p.p99_ms),
                _signed(before.p99_ms, p.p99_ms),
                _verdicts(p),
            )
        )
    return table(
        escape(f"During `{command}` ({during.seconds:.1f} s, {during.tps:,.1f} tps achieved)")
        + ": the budgets apply here",
        [
            "pattern",
            ">transactions",
            ">p95 alone",
            ">p95 during",
            ">shift",
            ">p99 alone",
            ">p99 during",
            ">shift",
            "budgets",
        ],
        rows,
    )


def _signed(before: float | None, after: float | None) -> str:
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return "-"
    shift = after - before
    return ("+" if shift >= 0 else "-") + format_ms(abs(shift))


def _render_command(during: model.Phase) -> None:
    command = during.command
    assert command is not None
    style = "green" if command.exit_code == 0 else "red"
    out.print(
        Text(
            f"`{shlex.join(command.shown)}` ran for {command.seconds:.1f} s and exited {command.exit_code}",
            style=style,
        )
    )
    shown = command.stdout if command.exit_code == 0 else command.stderr or command.stdout
    lines = [line for line in shown.splitlines() if line.strip()][-8:]
    for line in lines:
        out.print(Text("  " + line))


_BLOCKS = " ▁▂▃▄▅▆▇█"


def _chart(result: model.BenchResult) -> Table:
    """The share of each pattern's transactions per latency bucket, one column a bucket:
    a column per power of ten and its 2 and 5, buckets past the first budget in red."""
    rows: list[tuple[str, str, list[int]]] = []
    for phase in result.phases:
        for p in phase.patterns:
            rows.append((p.pattern, phase.name, [b.count for b in p.histogram]))
    used = [i for i in range(len(stats.BUCKETS_MS) + 1) if any(counts[i] for _, _, counts in rows)]
    first, last = (min(used), max(used)) if used else (0, 0)
    bounds: list[float | None] = [*stats.BUCKETS_MS, None]
    columns = ["pattern", "phase"] + [
        f"≤{format_limit(bound).replace(' ', '')}" if bound is not None else ">5s"
        for bound in bounds[first : last + 1]
    ]
    limits = {
        p.pattern: min((r.limit_ms for r in p.budgets if r.metric != OVERHEAD), default=None)
        for phase in result.phases
        for p in phase.patterns
    }
    rendered = []
    for name, phase_name, counts in rows:
        total = sum(counts) or 1
        cells = []
        for i in range(first, last + 1):
            share = counts[i] / total
            block = (
                _BLOCKS[min(len(_BLOCKS) - 1, math.ceil(share * (len(_BLOCKS) - 1)))] if counts[i] else "·"
            )
            lower = bounds[i - 1] if i > 0 else 0
            limit = limits[name]
            late = limit is not None and lower is not None and lower >= limit
            cells.append(f"[red]{block}[/red]" if late and counts[i] else block)
        rendered.append((name, phase_name, *cells))
    chart = table("Latency distribution (share of transactions per bucket)", columns, rendered)
    for column in chart.columns[2:]:
        column.justify = "center"
    return chart


def removed_line(removed: model.Removed, prefix: str) -> str | None:
    if not removed.users:
        return None
    runs = f" of {removed.runs} run{'s' if removed.runs != 1 else ''}" if removed.runs > 1 else ""
    return (
        f"{prefix} {removed.users:,} users{runs}, {removed.conversations:,} conversations, "
        f"{removed.messages:,} messages."
    )


def _verdict(result: model.BenchResult) -> str:
    judged = result.judged
    where = f"at {result.rate_tps:,.6g} tps" + (" during the command" if judged.command else "")
    lines = []
    if result.request.rate is None:
        if result.capacity_tps is None:
            lines.append(
                "[red]Capacity: no rate tried held every budget[/red]"
                f" (the lowest tried: {result.rate_tps:,.6g} tps)."
            )
        else:
            capped = " (the --max-rate: it may go higher)" if result.capacity_capped else " (within 10%)"
            lines.append(
                f"Capacity: {result.capacity_tps:,.6g} tps{capped},"
                " the highest rate at which every budget held."
            )
        if result.request.min_capacity is not None and not result.capacity_ok:
            minimum = result.request.min_capacity
            lines.append(f"[red]FAILED[/red]: the capacity is below --min-capacity {minimum:,.6g} tps.")
    if not result.command_ok:
        lines.append("[red]FAILED[/red]: the --while command did not succeed.")
    missed = judged.missed()
    if missed:
        lines.append(f"[red]FAILED[/red] {where}: " + escape(", ".join(missed)) + ".")
    elif result.ok:
        lines.append(f"[green]OK[/green]: every budget held {where}.")
    return "\n".join(lines)
