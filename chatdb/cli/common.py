"""What commands share to speak: consoles, errors on one line, JSON, tables, SQL to paste,
reports written beside the output, progress bars, and the question before a destructive
change. The options commands share are in ``chatdb.cli.options``, the database options
in ``chatdb.cli.connect``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from chatdb import units
from chatdb.cli import closed_pipe
from chatdb.errors import StateError, UsageError

if TYPE_CHECKING:
    from types import ModuleType

    from rich.progress import Progress, ProgressColumn
    from sqlalchemy import Engine


class _Console(Console):
    def on_broken_pipe(self) -> None:  # Rich's hook; its own exits 1
        closed_pipe()


# Consoles resolve sys.stdout/sys.stderr at write time, so test runners can capture them.
out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def write_report(path: Path, what: str, write: Callable[[Path], Any]) -> None:
    """Write a report with ``write(path)``; a place it cannot go is a usage error."""
    try:
        write(path)
    except OSError as exc:
        raise UsageError(f"cannot write the {what} to {path}: {exc.strerror or exc}") from None


def check_writable(path: Path, option: str) -> None:
    """A report that cannot be written is refused before the run, not after it."""
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        why = "it is a folder" if path.is_dir() else f"{folder} is not a folder chatdb may write to"
        raise UsageError(f"cannot write {option} {path}: {why}")


def without_secrets(text: str) -> str:
    """An error as chatdb shows it. Errors quote what the user typed (a bad value, an
    unexpected argument), which may be a URL with its password: each argument of the
    command line is masked whole (it may hold spaces), then the text by its structure."""
    from chatdb import db  # only for an error: --help does not load the data layer

    for argument in sorted(set(sys.argv[1:]), key=len, reverse=True):
        masked = db.mask_argument(argument)
        if masked != argument:
            text = text.replace(argument, masked)
    return db.mask_text(text)


def report_error(message: str, hint: str | None = None) -> None:
    """One red line on stderr, and a hint line when there is one, without a password."""
    # Messages quote the user's input, and Rich would read "[/x]" in it as markup.
    shown = escape(without_secrets(message))
    err.print(f"[red]error:[/red] {shown}", soft_wrap=True, markup=True, highlight=False)
    if hint:
        err.print(f"hint: {without_secrets(hint)}", soft_wrap=True, markup=False)


# --- output ---------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """The one JSON encoding: integers stay integers, times are ISO-8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def print_json(command: str, ok: bool, **fields: Any) -> None:
    for key in ("error", "hint"):  # as report_error shows them
        if isinstance(fields.get(key), str):
            fields[key] = without_secrets(fields[key])
    payload = {"command": command, "ok": ok, **to_jsonable(fields)}
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def json_fields(result: Any, *names: str) -> dict[str, Any]:
    """Attributes of ``result`` as ``print_json`` fields of the same names: ``names``, or
    else every field of the dataclass, in that order. ``elapsed`` (seconds, as measured)
    is ``elapsed_seconds``, to the millisecond."""
    fields = {}
    for name in names or [field.name for field in dataclasses.fields(result)]:
        value = getattr(result, name)
        if name == "elapsed":
            fields["elapsed_seconds"] = round(value, 3)
        else:
            fields[name] = value
    return fields


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """The one table renderer. Columns named with a leading '>' are right-aligned. A cell
    too wide for the console folds onto more lines rather than losing its end: names and
    statements must survive a narrow terminal."""
    rendered = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for column in columns:
        numeric = column.startswith(">")
        rendered.add_column(column.lstrip(">"), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        rendered.add_row(*("" if cell is None else str(cell) for cell in row))
    return rendered


def human_bytes(size: int) -> str:
    return units.size(size)


def print_sql(line: str) -> None:
    """One line of a fix, whole. On a terminal it is broken to the width at spaces outside
    quotes only, where SQL reads a line break as the space it was, and a ``--`` comment
    goes on as one; elsewhere (a CI log, a file) it is never broken."""
    if not out.is_terminal:
        out.print(Text(line), soft_wrap=True)
        return
    comment = line.startswith("--")
    prefix = "-- " if comment else ""
    words = line[2:].split() if comment else _SQL_WORD.findall(line)
    current = ""
    for word in words:
        joined = f"{current} {word}" if current else word
        if current and len(prefix) + len(joined) > out.width:
            out.print(Text(prefix + current), soft_wrap=True)
            joined = word
        current = joined
    out.print(Text(prefix + current), soft_wrap=True)


#: A word of SQL: what lies between spaces, a quoted literal or identifier counting as one.
_SQL_WORD = re.compile(r"""(?:'[^']*'|"[^"]*"|[^\s'"]|['"])+""")


@contextmanager
def progress_bar(
    title: str, columns: Callable[[ModuleType], Iterable[ProgressColumn]]
) -> Iterator[Progress | None]:
    """A progress bar on stderr that goes away when it is done: ``title`` in bold (Rich
    markup, formatted with ``task``), the bar, the columns that ``columns(rich.progress)``
    gives, and the time left. None when stderr is not a terminal (a cron job, a pipe),
    which then spends no time importing ``rich.progress``."""
    if not sys.stderr.isatty():
        yield None
        return
    import rich.progress as p

    shown = (p.TextColumn(f"[bold]{title}"), p.BarColumn(), *columns(p), p.TimeRemainingColumn())
    with p.Progress(*shown, console=err, transient=True) as bar:
        yield bar


# --- confirmation ---------------------------------------------------------------------------


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def confirm(question: str, *, yes: bool, off_terminal: str) -> None:
    """Ask before a destructive change. ``off_terminal`` is "proceed" (cron jobs) or
    "refuse" (changes nobody should make unattended without saying --yes)."""
    if yes:
        return
    if not stdin_is_terminal():
        if off_terminal == "proceed":
            return
        raise StateError("refusing to proceed without --yes when stdin is not a terminal")
    # Asked and answered on stderr and stdin: stdout carries only the result (--json).
    err.print(f"{question} [y/N]: ", end="", markup=False)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        err.print()  # the error goes on a line of its own
        raise
    if not answer.endswith("\n"):
        err.print()  # end of input (Ctrl-D)
    if answer.strip().lower() not in ("y", "yes"):
        raise StateError("cancelled; nothing was changed")


@contextmanager
def disposing(engine: Engine) -> Iterator[Engine]:
    try:
        yield engine
    finally:
        engine.dispose()
