"""How `verify-indexes` and `doctor` show what they found: a table, or one finding after
the other where a table does not fit; the statements that fix them, below; and the JUnit
report (bench writes one too)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from chatdb.cli.common import out, print_sql, write_report


def print_findings(
    names: int,
    frame: int,
    rendered: Callable[[], Table],
    one_by_one: Callable[[], Iterable[tuple[Text, str]]],
) -> None:
    """Findings as the table ``rendered()`` where it fits: off a terminal always (a CI log
    has no width: there each row stays on one line), on one when its name columns
    (``names`` wide in all), its borders and padding (``frame``) and 30 columns for the
    last leave the names whole. Else one finding after the other, each a head and its
    detail indented below."""
    if not out.is_terminal or out.width >= names + frame + 30:
        whole = rendered()
        if not out.is_terminal:
            whole.width = Measurement.get(out, out.options.update_width(1000), whole).maximum
        out.print(whole)
        return
    for head, detail in one_by_one():
        out.print(head, soft_wrap=False)
        out.print(Padding(Text(detail), (0, 0, 0, 2), expand=False), soft_wrap=False)


def print_fixes(heading: str, fixes: Iterable[tuple[str, str, str]]) -> None:
    """The statements that fix the findings, below them (a statement in a table cell folds
    inside identifiers and cannot be pasted), read as one psql script, comments and all:
    ``heading``, then each fix as (its statements, where, which checks) under a comment."""
    fixes = list(fixes)
    if not fixes:
        return
    out.print()
    print_sql(heading)
    for fix, where, checks in fixes:
        print_sql(f"-- {where}: {checks}")
        for line in fix.splitlines():
            print_sql(line)


def write_junit(report: ElementTree.ElementTree, path: Path) -> None:
    write_report(
        path, "JUnit report", lambda path: report.write(path, encoding="utf-8", xml_declaration=True)
    )


@dataclass(frozen=True)
class Case:
    """A check as a JUnit test case: it failed, was skipped, or passed (saying ``output``
    if anything). ``message`` says what was found; ``kind`` is a failure's type."""

    name: str
    failed: bool = False
    skipped: bool = False
    message: str = ""
    kind: str = ""
    fix: str | None = None
    output: str | None = None


def junit_report(
    command: str, elapsed: float, suites: Iterable[tuple[str, list[Case]]]
) -> ElementTree.ElementTree:
    """The checks of ``chatdb command`` as a JUnit report: a test suite per group (an
    empty one is left out), each with its counts of tests, failures, errors and skips."""
    groups = [(group, cases) for group, cases in suites if cases]
    root = ElementTree.Element("testsuites", name=f"chatdb {command}", time=f"{elapsed:.3f}")
    _count(root, [case for _, cases in groups for case in cases])
    for group, cases in groups:
        suite = ElementTree.SubElement(root, "testsuite", name=f"{command} {group}")
        _count(suite, cases)
        for case in cases:
            element = ElementTree.SubElement(
                suite, "testcase", classname=f"chatdb.{command}.{group}", name=case.name
            )
            fix = f"\n\nHow to fix:\n{case.fix}" if case.fix else ""
            if case.failed:
                failure = ElementTree.SubElement(element, "failure", message=case.message, type=case.kind)
                failure.text = case.message + fix
            elif case.skipped:
                ElementTree.SubElement(element, "skipped", message=case.message)
            elif case.output is not None:
                ElementTree.SubElement(element, "system-out").text = case.output + fix
    return ElementTree.ElementTree(root)


def _count(element: ElementTree.Element, cases: list[Case]) -> None:
    element.set("tests", str(len(cases)))
    element.set("failures", str(sum(case.failed for case in cases)))
    element.set("errors", "0")
    element.set("skipped", str(sum(case.skipped for case in cases)))
