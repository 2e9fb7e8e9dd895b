"""How a command declares its options, and the options several commands share: --json,
--yes, --junit FILE. The database options are in ``chatdb.cli.connect``.

A command module declares its own options as ``Annotated`` types beside its app (as
``chatdb.cli.seed`` does), each option that takes a value through ``option()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def option(name: str, metavar: str, help: str, **settings: Any) -> Any:
    """An option that takes a value, named in the help by ``metavar`` (``--users N``,
    ``--older-than DURATION``), never by a type label (``<int>``). ``settings`` are
    ``typer.Option``'s."""
    return typer.Option(name, metavar=metavar, help=help, **settings)


def report_file(name: str, help: str) -> Any:
    """The option of a report written beside the output (``--junit FILE``, ``--html FILE``)."""
    return option(name, "FILE", help, dir_okay=False)


JunitReport = Annotated[
    Path | None,
    report_file("--junit", "Also write a JUnit XML report to FILE, for CI systems to display."),
]
