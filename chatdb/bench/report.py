"""The reports of a bench run as documents: JUnit XML for CI systems, and a self-contained
HTML page (inline SVG, no script, nothing fetched) with a latency CDF per pattern."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from xml.etree import ElementTree

from chatdb.bench.model import BenchResult, Phase
from chatdb.bench.stats import OK, PatternFigures
from chatdb.bench.workload import OVERHEAD, WORKLOADS, format_limit, format_ms


def verdict_detail(pattern: PatternFigures, index: int) -> str:
    result = pattern.budgets[index]
    budget = result.budget
    if result.value_ms is None:
        return f"{pattern.pattern}: no transaction measured, so {budget.describe()} cannot be judged"
    what = "the soft-delete filter costs" if budget.metric == OVERHEAD else budget.metric
    relation = "under" if result.status == OK else "not under"
    return (
        f"{pattern.pattern}: {what} {format_ms(result.value_ms)}, {relation} the budget of "
        f"{format_limit(budget.limit_ms)} ({budget.source})"
    )


def junit(result: BenchResult) -> ElementTree.ElementTree:
    """One test case per budget of every pattern in the judged phase; a case for the
    transactions' failures, the --while command and --min-capacity where they apply; a
    skipped case for a pattern left out."""
    phase = result.judged
    root = ElementTree.Element("testsuites", name="chatdb bench", time=f"{phase.seconds:.3f}")
    suite = ElementTree.SubElement(
        root,
        "testsuite",
        name=f"chatdb bench {phase.name} at {result.rate_tps:g} tps",
        time=f"{phase.seconds:.3f}",
    )
    cases: list[tuple[str, str, str | None, bool]] = []  # classname, name, failure, skipped
    for pattern in phase.patterns:
        classname = f"chatdb.bench.{pattern.pattern}"
        for index, budget in enumerate(pattern.budgets):
            failure = None if budget.status == OK else verdict_detail(pattern, index)
            cases.append((classname, f"{pattern.pattern} {budget.budget.describe()}", failure, False))
        failure = None
        if pattern.failures:
            failure = f"{pattern.pattern}: {pattern.failures} transactions failed"
            if phase.errors:
                failure += f" (first error: {phase.errors[0]})"
        cases.append((classname, f"{pattern.pattern} transactions succeed", failure, False))
    for name, reason in result.left_out.items():
        cases.append((f"chatdb.bench.{name}", f"{name} (left out)", reason, True))
    if phase.command is not None:
        command = phase.command
        failure = None
        if command.exit_code != 0:
            failure = f"`{' '.join(command.shown)}` exited {command.exit_code}: {_last_line(command.stderr)}"
        cases.append(("chatdb.bench.while", f"`{' '.join(command.shown)}` succeeds", failure, False))
    if result.request.min_capacity is not None:
        wanted = result.request.min_capacity
        failure = None
        if not result.capacity_ok:
            found = f"{result.capacity_tps:g} tps" if result.capacity_tps is not None else "no rate tried"
            failure = f"capacity within the budgets: {found}, below --min-capacity {wanted:g} tps"
        cases.append(("chatdb.bench.capacity", f"capacity at least {wanted:g} tps", failure, False))
    for element in (root, suite):
        element.set("tests", str(len(cases)))
        element.set("failures", str(sum(1 for case in cases if case[2] and not case[3])))
        element.set("errors", "0")
        element.set("skipped", str(sum(1 for case in cases if case[3])))
    for classname, name, failure, skipped in cases:
        case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name)
        if skipped:
            ElementTree.SubElement(case, "skipped", message=failure or "")
        elif failure:
            element = ElementTree.SubElement(case, "failure", message=failure, type="budget")
            element.text = failure
    return ElementTree.ElementTree(root)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --- HTML -----------------------------------------------------------------------------------

_COLORS = {"alone": "#1f77b4", "during": "#d62728"}
_WIDTH, _HEIGHT, _LEFT, _BOTTOM, _TOP, _RIGHT = 560, 260, 48, 36, 14, 16


def page(result: BenchResult) -> str:
    """The whole report as one HTML document."""
    request = result.request
    judged = result.judged
    title = "chatdb bench"
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .7em;border-bottom:1px solid #ddd;"
        "text-align:right}td:first-child,th:first-child{text-align:left}.ok{color:#1a7f37}.fail{color:#cf222e}"
        "figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-weight:600}</style>",
        "</head><body>",
        f"<h1>{title}</h1>",
    ]
    verdict = "every budget held" if result.ok else "a budget was missed"
    lines.append(
        f'<p class="{"ok" if result.ok else "fail"}"><strong>{_e(verdict.capitalize())}</strong></p>'
    )
    facts = [
        f"{request.clients} clients",
        f"{result.rate_tps:g} tps scheduled (open model: latency from each transaction's scheduled start)",
        f"{request.seconds} s per run",
        "mix " + _e(", ".join(f"{name}={weight}" for name, weight in result.mix.items())),
        _e(result.pgbench),
    ]
    if result.capacity_tps is not None or request.rate is None:
        found = "none held" if result.capacity_tps is None else f"{result.capacity_tps:g} tps"
        facts.append(f"capacity within the budgets: {found}")
    if result.key_cost_ms is not None:
        facts.append(f"carrying a key costs {format_ms(result.key_cost_ms)} per transaction")
    lines.append("<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>")
    for name, reason in result.left_out.items():
        lines.append(f"<p>{_e(name)} was left out: {_e(reason)}.</p>")
    for phase in result.phases:
        lines.append(f"<h2>{_e(_phase_title(phase))}</h2>")
        lines.append(_figures_table(phase, judged=phase is judged))
    lines.append("<h2>Latency CDF per pattern</h2>")
    for name in result.mix:
        curves = [(phase.name, p) for phase in result.phases for p in phase.patterns if p.pattern == name]
        lines.append(_cdf(name, curves))
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def _phase_title(phase: Phase) -> str:
    if phase.command is None:
        return f"{phase.name}: {phase.rate_tps:g} tps for {phase.seconds:.0f} s"
    command = phase.command
    return (
        f"during `{' '.join(command.shown)}`: {phase.rate_tps:g} tps for {command.seconds:.1f} s "
        f"(the command exited {command.exit_code})"
    )


def _figures_table(phase: Phase, *, judged: bool) -> str:
    head = ["pattern", "transactions", "tps", "p50", "p95", "p99", "max", "failures", "budgets"]
    rows = []
    for p in phase.patterns:
        verdicts = []
        for result in p.budgets:
            css = "ok" if result.status == OK else "fail"
            text = f"{result.budget.describe()}: {format_ms(result.value_ms)}"
            verdicts.append(f'<span class="{css if judged else ""}">{_e(text)}</span>')
        cells = [
            _e(p.pattern),
            f"{p.transactions:,}",
            f"{p.tps:,.1f}",
            _e(format_ms(p.p50_ms)),
            _e(format_ms(p.p95_ms)),
            _e(format_ms(p.p99_ms)),
            _e(format_ms(p.max_ms)),
            f"{p.failures:,}",
            "<br>".join(verdicts),
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _cdf(name: str, curves: Sequence[tuple[str, PatternFigures]]) -> str:
    finite = [v for _, p in curves for v in p.latencies_ms if math.isfinite(v) and v > 0]
    limits = [r.budget.limit_ms for _, p in curves for r in p.budgets if r.budget.metric != OVERHEAD]
    low = min([*finite, *limits, 1.0])
    high = max([*finite, *limits, low * 10])
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(value: float) -> float:
        value = min(max(value, 10**lo), 10**hi)
        return _LEFT + (math.log10(value) - lo) / (hi - lo) * plot_w

    def y(share: float) -> float:
        return _TOP + (1 - share) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="latency CDF of {_e(name)}">',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for exponent in range(lo, hi + 1):
        value = 10**exponent
        label = format_limit(value)
        at = f"{x(value):.1f}"
        parts.append(f'<line x1="{at}" x2="{at}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#eee"/>')
        parts.append(
            f'<text x="{at}" y="{_HEIGHT - _BOTTOM + 14}" font-size="11" text-anchor="middle">{label}</text>'
        )
    for share in (0, 0.25, 0.5, 0.75, 0.95):
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y(share) + 4:.1f}" font-size="11" text-anchor="end">{share:g}</text>'
        )
        level = f"{y(share):.1f}"
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{level}" y2="{level}" stroke="#eee"/>')
    for limit in sorted(set(limits)):
        parts.append(
            f'<line x1="{x(limit):.1f}" x2="{x(limit):.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" '
            'stroke="#888" stroke-dasharray="4 3"><title>budget '
            f"{format_limit(limit)}</title></line>"
        )
    legend = []
    for phase_name, p in curves:
        values = p.latencies_ms
        if not values:
            continue
        color = _COLORS.get(phase_name, "#333")
        points = []
        count = len(values)
        step = max(1, count // 400)
        for index in [*range(0, count, step), count - 1]:
            value = values[index]
            if not math.isfinite(value):
                break
            points.append(f"{x(value):.1f},{y((index + 1) / count):.1f}")
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(points)}"/>'
        )
        legend.append(f'<span style="color:{color}">{_e(phase_name)}</span>')
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.0f}" y="{_HEIGHT - 4}" font-size="11" text-anchor="middle">'
        "latency from the scheduled start (log scale)</text>"
    )
    parts.append("</svg>")
    caption = f"{_e(name)}: {_e(WORKLOADS[name].title)} ({' / '.join(legend)}; dashed: budgets)"
    return f"<figure><figcaption>{caption}</figcaption>{''.join(parts)}</figure>"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
