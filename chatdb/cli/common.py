"""What every command shares: options, consoles, the error boundary, output and prompts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from chatdb import citus, db, privileges
from chatdb.errors import (
    EXIT_CLOSED_PIPE,
    EXIT_CONNECT,
    EXIT_INTERRUPTED,
    EXIT_PROBLEM,
    EXIT_TERMINATED,
    ChatdbError,
    StateError,
    UsageError,
    one_line,
)


def closed_pipe() -> NoReturn:
    """The reader of chatdb's output went away (`chatdb status --json | head -1`). That is no
    error of chatdb's: stop at once, quietly, as Unix tools do. stdout and stderr now lead to
    /dev/null, so that what is left in their buffers cannot fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a test runner's stream has no fd
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    raise SystemExit(EXIT_CLOSED_PIPE)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # Rich's hook; its own exits 1
        closed_pipe()


# Consoles resolve sys.stdout/sys.stderr at write time, so test runners can capture them.
out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)

#: A day: longer is a typo, and libpq's connect_timeout must stay an integer.
MAX_CONNECT_TIMEOUT = 86_400

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (postgresql://user:password@host:port/db). "
        "Default: CHATDB_DATABASE_URL, then DATABASE_URL, then the embedded server.",
        show_default=False,
    ),
]
ConnectTimeout = Annotated[
    float | None,
    typer.Option(
        "--connect-timeout",
        # The option's own default is None, so that one given before the command name
        # counts when none comes after it: the help states the timeout that then applies
        # (the bracket escaped, or Rich would read "[default: 10]" as markup and drop it).
        help="Seconds to keep retrying a server that does not answer. "
        f"\\[default: {db.DEFAULT_CONNECT_TIMEOUT:g}]",
        min=0,
        show_default=False,
    ),
]
JsonOutput = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


@dataclasses.dataclass
class Settings:
    """Options given before the command name; options after it take precedence."""

    database_url: str | None = None
    connect_timeout: float | None = None
    # The database in use, once resolved.
    database: db.Database | None = None


def settings(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = Settings()
    return root.obj


def adopt_group_options(ctx: typer.Context, database_url: str | None, connect_timeout: float | None) -> None:
    """Options given between a group's name and its subcommand (`chatdb migrate
    --database-url URL status`) apply to the subcommand."""
    state = settings(ctx)
    if database_url is not None:
        state.database_url = database_url
    if connect_timeout is not None:
        state.connect_timeout = connect_timeout


def open_engine(
    ctx: typer.Context,
    command: str,
    database_url: str | None = None,
    connect_timeout: float | None = None,
) -> Engine:
    """Resolve the database (announcing the embedded default), connect, and return the
    engine. Connection problems raise ConnectError (exit 3)."""
    state = settings(ctx)
    timeout = connect_timeout if connect_timeout is not None else state.connect_timeout
    if timeout is not None and not 0 <= timeout <= MAX_CONNECT_TIMEOUT:
        raise UsageError(
            f"--connect-timeout must be between 0 and {MAX_CONNECT_TIMEOUT:,} seconds, not {timeout:g}"
        )
    database = db.resolve_database(database_url if database_url is not None else state.database_url)
    state.database = database
    if database.source == "embedded":
        from chatdb import embedded

        # Which folder, and whether it was just created (running elsewhere makes a new one).
        err.print(f"chatdb: {embedded.last_started.describe()}", soft_wrap=True, markup=False)
    timeout = db.DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout
    with _waiting(database, timeout) as on_wait:
        return db.connect(
            database, application_name=f"chatdb {command}", connect_timeout=timeout, on_wait=on_wait
        )


@contextmanager
def _waiting(database: db.Database, timeout: float) -> Iterator[Callable[[float], None] | None]:
    """While the server does not answer, a spinner line on a terminal's stderr says for
    which database and for how long chatdb waits; it is erased when waiting ends. Off a
    terminal (cron, pipes) nothing is shown."""
    if not sys.stderr.isatty():
        yield None
        return
    status: Status | None = None
    since = 0.0

    class Waited:
        def __rich__(self) -> Text:  # rendered on every refresh: the seconds keep counting
            waited = min(time.monotonic() - since, timeout)
            return Text(f"waiting for {database.display} ({int(waited)} s of {timeout:g} s)")

    def on_wait(waited: float) -> None:
        nonlocal status, since
        if status is None:
            since = time.monotonic() - waited
            status = err.status(Waited())
            status.start()

    try:
        yield on_wait
    finally:
        if status is not None:
            status.stop()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the command stops where it is safe to."""


class TerminatedRead(Terminated, KeyboardInterrupt):
    """SIGTERM outside the batches of archive and purge. A KeyboardInterrupt too, so that
    psycopg cancels the statement it interrupts in the server, as it does for Ctrl-C,
    instead of leaving it to run (a batch's COMMIT in flight is left to finish: see
    cli.lifecycle._Signals)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise TerminatedRead()


def report_file(option: str, help: str) -> Any:
    """The option of a report written beside the output (``--junit FILE``, ``--html FILE``)."""
    return typer.Option(option, metavar="FILE", dir_okay=False, help=help)


JunitReport = Annotated[
    Path | None,
    report_file("--junit", "Also write a JUnit XML report to FILE, for CI systems to display."),
]


def report_error(message: str, hint: str | None = None) -> None:
    """One red line on stderr, and a hint line when there is one."""
    # Messages quote the user's input, and Rich would read "[/x]" in it as markup.
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
    if hint:
        err.print(f"hint: {hint}", soft_wrap=True, markup=False)


def _fail(message: str, code: int, hint: str | None = None, json_command: str | None = None) -> typer.Exit:
    """The error on stderr; with --json, also the one JSON object on stdout."""
    report_error(message, hint)
    if json_command is not None:
        print_json(json_command, False, error=message, exit_code=code, hint=hint)
    return typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The error boundary of every command: domain errors become one red line and the
    exit code of docs/architecture.md; Ctrl-C exits 130 and SIGTERM 143; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx")  # every command that touches a database takes ctx
        json_command = _command_name(ctx) if kwargs.get("as_json") else None
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = _in_main_thread()
        if in_main_thread:
            signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except ChatdbError as exc:
            # chatdb's own messages show URLs only as Database.display, and never echo a URL
            # that could not be parsed; the driver's text is masked by structure.
            raise _fail(exc.message, exc.exit_code, exc.hint, json_command) from None
        except DBAPIError as exc:
            if (distributed := citus.distribution_error(exc)) is not None:
                raise _fail(
                    db.mask_text(distributed.message), EXIT_PROBLEM, distributed.hint, json_command
                ) from None
            message = db.mask_text(one_line(exc))
            code = EXIT_CONNECT if exc.connection_invalidated else EXIT_PROBLEM
            hint = privileges.HINT if getattr(exc.orig, "sqlstate", None) == "42501" else None
            raise _fail(f"database error: {message}", code, hint, json_command) from None
        except Terminated:
            raise _fail("terminated", EXIT_TERMINATED, json_command=json_command) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", EXIT_INTERRUPTED, json_command=json_command) from None
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            closed_pipe()
        except Exception as exc:
            if (distributed := citus.distribution_error(exc)) is not None:  # psycopg's own, as COPY raises
                raise _fail(
                    db.mask_text(distributed.message), EXIT_PROBLEM, distributed.hint, json_command
                ) from None
            if os.environ.get("CHATDB_DEBUG"):
                traceback.print_exc()
            message = db.mask_text(f"{type(exc).__name__}: {exc}")
            raise _fail(
                f"internal error: {message}",
                EXIT_PROBLEM,
                "set CHATDB_DEBUG=1 for the traceback, and please report it",
                json_command,
            ) from None
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _command_name(ctx: typer.Context | None) -> str:
    """The command as the user typed it, without the program name: "migrate status"."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(names)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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
    payload = {"command": command, "ok": ok, **to_jsonable(fields)}
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


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
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
