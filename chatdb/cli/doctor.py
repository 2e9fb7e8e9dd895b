"""``chatdb doctor``: what needs attention, with the statements that fix it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from chatdb import doctor as diagnosis
from chatdb.cli.common import check_writable, disposing, human_bytes, json_fields, out, print_json, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.findings import Case, junit_report, print_findings, print_fixes, write_junit
from chatdb.cli.options import JsonOutput, JunitReport, option
from chatdb.doctor.model import FAIL, OK, SKIPPED, WARN, Finding, duration
from chatdb.errors import EXIT_PROBLEM

COMMAND = "doctor"
_STYLE = {OK: "green", WARN: "yellow", FAIL: "red", SKIPPED: "dim"}
#: Areas whose every finding is shown: they inform rather than judge.
_INFORMATIVE = {"growth", "retention"}
_BAR = 30

app = new_app()

Deep = Annotated[
    bool,
    typer.Option(
        "--deep",
        help="Also read tables and indexes: exact bloat (pgstattuple), index integrity (amcheck), "
        "exact retention counts. Takes time in proportion to the data.",
    ),
]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")]
SizeLimit = Annotated[
    str | None,
    option(
        "--size-limit", "SIZE", "A storage quota (10GB, 500MB): project the date the database reaches it."
    ),
]
OlderThan = Annotated[
    str | None,
    option(
        "--older-than",
        "DURATION",
        "A retention cutoff (180d) to look ahead at: what passes it now, within 7 and 30 days. "
        "Default: those of the latest archive and purge runs.",
    ),
]
Threshold = Annotated[
    list[str] | None,
    option(
        "--threshold",
        "NAME=VALUE",
        "Change a threshold (repeatable), e.g. dead_ratio=0.1 or idle_in_transaction_seconds=30. "
        f"Names: {', '.join(diagnosis.Thresholds.names())}.",
    ),
]
ShowAll = Annotated[bool, typer.Option("--all", help="List the checks that passed too.")]


@command(app, COMMAND, database=True)
def doctor(
    ctx: typer.Context,
    deep: Deep = False,
    strict: Strict = False,
    size_limit: SizeLimit = None,
    older_than: OlderThan = None,
    threshold: Threshold = None,
    show_all: ShowAll = False,
    junit: JunitReport = None,
    as_json: JsonOutput = False,
) -> None:
    """What needs attention: seed 000's monitoring and maintenance list, as checks with
    the statements that fix them.

    Vacuum (dead rows archive and purge leave, stale statistics), bloat, index use, slow
    statements (pg_stat_statements), connections and sessions idle in a transaction,
    transaction ID wraparound, cache hit ratio, growth per day and per week (each run
    records the tables' sizes), the retention outlook, and replication slots. Catalog
    and statistics only, unless --deep. A check that lacks a privilege or an extension
    is skipped, saying why. Exit code 1 on a failure (or a warning, with --strict).
    The operations role needs pg_monitor: `chatdb grants` prints it.

    Example:

        chatdb doctor

        chatdb doctor --size-limit 10GB --older-than 180d --json --junit doctor.xml
    """
    from chatdb import lifecycle
    from chatdb.doctor.run import diagnose

    thresholds = diagnosis.Thresholds().replace(threshold or [])
    limit = diagnosis.parse_size(size_limit, "--size-limit") if size_limit is not None else None
    cutoff = lifecycle.parse_duration(older_than, "--older-than") if older_than is not None else None
    options = diagnosis.Options(deep=deep, size_limit=limit, older_than=cutoff, thresholds=thresholds)
    if junit is not None:
        check_writable(junit, "--junit")
    with disposing(open_engine(ctx, COMMAND)) as engine:
        report = diagnose(engine, options)
    if junit is not None:
        write_junit(junit_report(COMMAND, report.elapsed, _junit(report, strict)), junit)
    failed = report.failed(strict)
    if as_json:
        print_json(
            COMMAND,
            not failed,
            **json_fields(report, "database", "user", "server_version", "revision"),
            deep=deep,
            strict=strict,
            counts={status: report.count(status) for status in diagnosis.STATUSES},
            **json_fields(report, "elapsed"),
            deep_seconds=round(report.deep_seconds, 3) if deep else None,
            deep_read_bytes=report.deep_read_bytes if deep else None,
            recorded=report.recorded,
            growth=report.growth,
            checks=[finding.as_dict() for finding in report.findings],
        )
    else:
        _render(report, show_all, strict)
    if failed:
        raise typer.Exit(EXIT_PROBLEM)


# --- people -----------------------------------------------------------------------------------


def _number(value: Any, unit: str | None) -> str:
    if value is None:
        return ""
    if unit == "bytes":
        return human_bytes(int(value))
    if unit == "seconds":
        return duration(value)
    if unit == "ratio":
        return f"{float(value):.2%}"
    if unit == "ms":
        return f"{float(value):,.2f} ms"
    if isinstance(value, int | float):
        return f"{value:,}"
    return str(value)


def _measured(finding: Finding) -> str:
    value = _number(finding.value, finding.unit)
    if finding.threshold is None or finding.status == SKIPPED:
        return value
    return f"{value} / {_number(finding.threshold, finding.unit)}" if value else ""


def _shown(report: diagnosis.Report, show_all: bool) -> list[Finding]:
    """Every finding that is not ok, every informative one, and per area a line for those
    that passed (all of them with --all)."""
    rows: list[Finding] = []
    for area in diagnosis.AREAS:
        found = [finding for finding in report.findings if finding.area == area]
        if show_all or area in _INFORMATIVE:
            rows += found
            continue
        rows += [finding for finding in found if finding.status != OK]
        passed = [finding for finding in found if finding.status == OK]
        if len(passed) == len(found) == 1:
            rows += passed
        elif passed:
            checks = sorted({finding.check for finding in passed})
            rows.append(
                Finding(area, None, "", OK, detail=f"{len(passed)} checks passed ({', '.join(checks)})")
            )
    return rows


def _render(report: diagnosis.Report, show_all: bool, strict: bool) -> None:
    deep = (
        f"; --deep read {human_bytes(report.deep_read_bytes)} in {report.deep_seconds:.1f} s"
        if report.deep_seconds
        else ""
    )
    out.print(
        f"PostgreSQL {report.server_version}, database {report.database} as {report.user}{deep}",
        markup=False,
    )
    rows = _shown(report, show_all)
    cells = [[f.area, f.object or "", f.check, f.status, _measured(f), f.detail] for f in rows]
    names = sum(max((len(row[column]) for row in cells), default=0) for column in range(5))
    print_findings(names, 18, lambda: _table(rows, cells), lambda: _one_by_one(rows, cells))
    _print_charts(report.growth)
    _print_fixes(report.findings, strict)
    out.print(_verdict(report, strict))


def _table(rows: list[Finding], cells: list[list[str]]) -> Table:
    rendered = table(None, ["area", "object", "check", "status", ">measured / threshold", "detail"], ())
    previous = None
    for finding, row in zip(rows, cells, strict=True):
        if previous is not None and finding.area != previous:
            rendered.add_section()
        style = _STYLE[finding.status]
        rendered.add_row(
            escape(row[0]) if finding.area != previous else "",
            escape(row[1]),
            escape(row[2]),
            f"[{style}]{row[3]}[/{style}]",
            escape(row[4]),
            escape(row[5]),
        )
        previous = finding.area
    return rendered


def _one_by_one(rows: list[Finding], cells: list[list[str]]) -> Iterator[tuple[Text, str]]:
    """Where a table does not fit: each finding's head, and its detail."""
    for finding, row in zip(rows, cells, strict=True):
        where = " ".join(part for part in (row[0], row[1]) if part)
        head = Text(f"{where}: {row[2] + ' ' if row[2] else ''}", style="bold")
        head.append(row[3], style=_STYLE[finding.status])
        if row[4]:
            head.append(f" ({row[4]})")
        yield head, row[5]


def _print_fixes(findings: list[Finding], strict: bool) -> None:
    fixes: dict[str, list[Finding]] = {}
    for finding in findings:
        if finding.fix and finding.status in (WARN, FAIL):
            fixes.setdefault(finding.fix, []).append(finding)
    print_fixes(
        "-- To fix, run each statement on its own (as psql does); "
        "lines starting with -- say what else to do:",
        (
            (fix, found[0].object or found[0].area, ", ".join(dict.fromkeys(f.check for f in found)))
            for fix, found in fixes.items()
        ),
    )


def _print_charts(growth: Any) -> None:
    if growth is None:
        return
    for title, points in (("per day (UTC)", growth.daily), ("per week", growth.weekly)):
        changes = [p for p in points if p.change is not None]
        if not changes:
            continue
        out.print()
        out.print(f"Growth of the database, {title}:", markup=False)
        largest = max(abs(p.change) for p in changes) or 1
        width = max(len(p.label) for p in points)
        for point in points:
            line = Text(point.label.ljust(width) + "  ")
            if point.change is None:
                line.append(" " * _BAR + f"  {human_bytes(point.total_bytes):>9}")
            else:
                length = round(_BAR * abs(point.change) / largest)
                bar = ("█" if point.change >= 0 else "░") * length
                line.append(bar.ljust(_BAR), style="green" if point.change >= 0 else "yellow")
                sign = "+" if point.change >= 0 else "-"
                line.append(f"  {human_bytes(point.total_bytes):>9}  {sign}{human_bytes(abs(point.change))}")
            out.print(line, soft_wrap=True)
    if growth.reaches_limit is not None:
        out.print(
            f"At {human_bytes(int(growth.per_day))}/day it reaches {human_bytes(growth.size_limit)}"
            f" around {growth.reaches_limit.astimezone(dt.UTC):%Y-%m-%d}.",
            markup=False,
        )


def _verdict(report: diagnosis.Report, strict: bool) -> str:
    warnings, failures, skipped = report.count(WARN), report.count(FAIL), report.count(SKIPPED)
    total = len(report.findings)
    tally = (
        f"{total} checks: {failures} failed, {warnings} "
        f"warning{'s' if warnings != 1 else ''}, {skipped} skipped"
    )
    if report.failed(strict):
        return f"[red]FAILED[/red]: {tally}."
    if warnings:
        return f"[yellow]WARNINGS[/yellow]: {tally}."
    return f"[green]OK[/green]: {tally}."


# --- machines ----------------------------------------------------------------------------------


def _junit(report: diagnosis.Report, strict: bool) -> list[tuple[str, list[Case]]]:
    """Every check as a JUnit test case, one test suite per area. A failure fails; a
    warning fails with --strict and otherwise passes with its detail; skipped is skipped."""
    return [
        (
            area,
            [
                Case(
                    f"{finding.check}: {finding.object}" if finding.object else finding.check,
                    failed=finding.status == FAIL or (strict and finding.status == WARN),
                    skipped=finding.status == SKIPPED,
                    message=finding.detail,
                    kind=finding.status,
                    fix=finding.fix,
                    output=f"{finding.status}: {finding.detail}",
                )
                for finding in report.findings
                if finding.area == area
            ],
        )
        for area in diagnosis.AREAS
    ]
