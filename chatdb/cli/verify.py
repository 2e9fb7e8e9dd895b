"""``chatdb verify-indexes``: prove that every index chatdb expects exists, matches its
declaration exactly, is valid, and serves its query."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.text import Text

from chatdb.cli.common import check_writable, disposing, json_fields, out, print_json, table
from chatdb.cli.connect import open_engine
from chatdb.cli.declare import command, new_app
from chatdb.cli.findings import Case, junit_report, print_findings, print_fixes, write_junit
from chatdb.cli.options import JsonOutput, JunitReport
from chatdb.errors import EXIT_PROBLEM

if TYPE_CHECKING:
    from chatdb import indexes

COMMAND = "verify-indexes"

app = new_app()

AllowExtra = Annotated[
    bool, typer.Option("--allow-extra", help="Accept indexes that chatdb/schema.py does not declare.")
]


@command(app, COMMAND, database=True)
def verify_indexes(
    ctx: typer.Context,
    allow_extra: AllowExtra = False,
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
    from chatdb import indexes

    if junit is not None:
        check_writable(junit, "--junit")
    with disposing(open_engine(ctx, COMMAND)) as engine:
        report = indexes.verify_indexes(engine, allow_extra=allow_extra)
    if junit is not None:
        write_junit(junit_report(COMMAND, report.elapsed, _junit(report)), junit)
    findings = report.findings
    if as_json:
        print_json(
            COMMAND,
            report.ok,
            revision=json_fields(report, "current", "head"),
            passed=len(report.checks) - len(findings),
            failed=len(findings),
            **json_fields(report, "elapsed", "checks"),
        )
    else:
        if findings:
            _print_findings(findings)
        out.print(_verdict(report))
    if findings:
        raise typer.Exit(EXIT_PROBLEM)


def _print_findings(findings: list[indexes.Check]) -> None:
    """The findings, then their fixes below them."""
    from chatdb import indexes

    rows = [[c.table or "", c.index or "", c.check, c.detail] for c in findings]
    names = sum(max(len(row[column]) for row in rows) for column in range(3))
    print_findings(
        names,
        _TABLE_FRAME,
        lambda: table(None, ["table", "index", "check", "what is wrong"], map(_escaped, rows)),
        lambda: ((Text(f"{_where(check)}: {check.check}", style="bold"), check.detail) for check in findings),
    )
    # One fix for several findings (a missing index fails its query and foreign key checks
    # too) is shown once: its statements are to be run once.
    fixes: dict[str, list[indexes.Check]] = {}
    for check in findings:
        if check.fix and check.check != indexes.REVISION:  # the verdict says `chatdb migrate`
            fixes.setdefault(check.fix, []).append(check)
    print_fixes(
        "-- To fix, run each statement on its own, outside a transaction (as psql does):",
        (
            (fix, _where(checks[0]), ", ".join(check.check for check in checks))
            for fix, checks in fixes.items()
        ),
    )


#: The findings table's borders and padding.
_TABLE_FRAME = 11


def _escaped(row: list[str]) -> list[str]:
    return [escape(value) for value in row]


def _where(check: indexes.Check) -> str:
    return ".".join(part for part in (check.table, check.index) if part) or "database"


def _verdict(report: indexes.VerifyReport) -> str:
    from chatdb import indexes

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


def _junit(report: indexes.VerifyReport) -> list[tuple[str, list[Case]]]:
    """Every check as a JUnit test case, one test suite per table."""
    groups: dict[str, list[Case]] = {}
    for check in report.checks:
        groups.setdefault(check.table or "database", []).append(
            Case(
                f"{check.check}: {check.index}" if check.index else check.check,
                failed=check.failed,
                message=check.detail,
                kind=check.check,
                fix=check.fix,
            )
        )
    return list(groups.items())
