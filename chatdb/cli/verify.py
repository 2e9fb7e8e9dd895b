"""``chatdb verify-indexes``: prove that every index chatdb expects exists, matches its
declaration exactly, is valid, and serves its query."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated
from xml.etree import ElementTree

import typer
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.text import Text

from chatdb import indexes
from chatdb.cli.common import JsonOutput, JunitReport, disposing, out, print_json, print_sql, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.errors import EXIT_PROBLEM, UsageError

COMMAND = "verify-indexes"

app = new_app()


@command(app, COMMAND, database=True)
def verify_indexes(
    ctx: typer.Context,
    allow_extra: Annotated[
        bool,
        typer.Option("--allow-extra", help="Accept indexes that chatdb/schema.py does not declare."),
    ] = False,
    junit: JunitReport = None,
    as_json: JsonOutput = False,
) -> None:
    """Prove that every index chatdb expects exists, matches exactly, is valid
    and serves its query. Run it in CI after `chatdb migrate`, and before deploys.

    On chatdb's tables (hot, archive, audit), against chatdb/schema.py: missing
    and unexpected indexes; drift in key columns and their order, expressions,
    ASC/DESC and NULLS order, operator classes, collations, INCLUDE columns,
    partial predicate, access method and uniqueness; invalid indexes (left by a
    failed CREATE INDEX CONCURRENTLY); exact duplicates and left prefixes;
    foreign keys without a covering index; and, by EXPLAIN of each query
    pattern, that its own index serves it without a sort. Each finding comes
    with the statements that fix it. Nothing is changed: the checks run in
    transactions that are rolled back.

    A database behind head gets one finding (run `chatdb migrate`) and no index
    checks. Exit code 0: no findings; 1: findings, or no chatdb schema.

    Example:

        chatdb verify-indexes

        chatdb verify-indexes --json --junit verify-indexes.xml
    """
    with disposing(open_engine(ctx, COMMAND)) as engine:
        report = indexes.verify_indexes(engine, allow_extra=allow_extra)
    if junit is not None:
        write_junit(report, junit)
    findings = report.findings
    if as_json:
        print_json(
            COMMAND,
            report.ok,
            revision={"current": report.current, "head": report.head},
            passed=len(report.checks) - len(findings),
            failed=len(findings),
            elapsed_seconds=round(report.elapsed, 3),
            checks=report.checks,
        )
    else:
        if findings:
            _print_findings(findings)
        out.print(_verdict(report))
    if findings:
        raise typer.Exit(EXIT_PROBLEM)


def _print_findings(findings: list[indexes.Check]) -> None:
    """The findings, then their fixes below them: a statement in a table cell folds at the
    cell's width, inside identifiers, and cannot be pasted."""
    rows = [[c.table or "", c.index or "", c.check, c.detail] for c in findings]
    names = sum(max(len(row[column]) for row in rows) for column in range(3))
    if not out.is_terminal or out.width >= names + _TABLE_FRAME + _DETAIL_ROOM:
        rendered = table(None, ["table", "index", "check", "what is wrong"], map(_escaped, rows))
        if not out.is_terminal:
            # A CI log has no width: there, each row stays on one line.
            rendered.width = Measurement.get(out, out.options.update_width(1000), rendered).maximum
        out.print(rendered)
    else:  # too narrow for a table that keeps names whole: one finding after the other
        for check in findings:
            out.print(Text(f"{_where(check)}: {check.check}", style="bold"), soft_wrap=False)
            out.print(Padding(Text(check.detail), (0, 0, 0, 2), expand=False), soft_wrap=False)
    # One fix for several findings (a missing index fails its query and foreign key checks
    # too) is shown once: its statements are to be run once.
    fixes: dict[str, list[indexes.Check]] = {}
    for check in findings:
        if check.fix and check.check != indexes.REVISION:  # the verdict says `chatdb migrate`
            fixes.setdefault(check.fix, []).append(check)
    if not fixes:
        return
    out.print()
    # The whole section reads as one psql script, comments and all.
    print_sql("-- To fix, run each statement on its own, outside a transaction (as psql does):")
    for fix, checks in fixes.items():
        print_sql(f"-- {_where(checks[0])}: {', '.join(check.check for check in checks)}")
        for line in fix.splitlines():
            print_sql(line)


#: The findings table's borders and padding, and the least room that leaves its last column.
_TABLE_FRAME, _DETAIL_ROOM = 11, 30


def _escaped(row: list[str]) -> list[str]:
    return [escape(value) for value in row]


def _where(check: indexes.Check) -> str:
    return ".".join(part for part in (check.table, check.index) if part) or "database"


def _verdict(report: indexes.VerifyReport) -> str:
    findings = report.findings
    if not findings:
        return (
            f"[green]OK[/green]: all {len(report.checks)} checks passed: every index chatdb expects "
            "exists, matches, is valid and serves its query."
        )
    if any(check.check == indexes.REVISION for check in findings):
        return "[red]FAILED[/red]: the database is behind head; run `chatdb migrate`, then verify again."
    tables = {check.table for check in findings if check.table}
    return (
        f"[red]FAILED[/red]: {len(findings)} of {len(report.checks)} checks found problems"
        f" on {len(tables)} table{'s' if len(tables) != 1 else ''}."
    )


def junit_report(report: indexes.VerifyReport) -> ElementTree.ElementTree:
    """Every check as a JUnit test case, one test suite per table."""
    root = ElementTree.Element("testsuites", name=f"chatdb {COMMAND}", time=f"{report.elapsed:.3f}")
    _count(root, report.checks)
    groups: dict[str, list[indexes.Check]] = {}
    for check in report.checks:
        groups.setdefault(check.table or "database", []).append(check)
    for group, checks in groups.items():
        suite = ElementTree.SubElement(root, "testsuite", name=f"{COMMAND} {group}", skipped="0")
        _count(suite, checks)
        for check in checks:
            case = ElementTree.SubElement(
                suite,
                "testcase",
                classname=f"chatdb.{COMMAND}.{group}",
                name=f"{check.check}: {check.index}" if check.index else check.check,
            )
            if check.failed:
                failure = ElementTree.SubElement(case, "failure", message=check.detail, type=check.check)
                failure.text = check.detail + (f"\n\nHow to fix:\n{check.fix}" if check.fix else "")
    return ElementTree.ElementTree(root)


def _count(element: ElementTree.Element, checks: Iterable[indexes.Check]) -> None:
    checks = list(checks)
    element.set("tests", str(len(checks)))
    element.set("failures", str(sum(check.failed for check in checks)))
    element.set("errors", "0")


def write_junit(report: indexes.VerifyReport, path: Path) -> None:
    try:
        junit_report(report).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise UsageError(f"cannot write the JUnit report to {path}: {exc.strerror or exc}") from None
