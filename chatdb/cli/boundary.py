"""The error boundary of every command: what a command raises becomes one line on stderr
and the exit code of docs/architecture.md; never a traceback.

A command needs nothing to be under it: the command classes of ``chatdb.cli.declare`` run
every command inside ``error_boundary()``, which reads what it needs (the command's name,
whether --json was given) from the command's context.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from chatdb.cli import closed_pipe
from chatdb.cli.common import print_json, report_error
from chatdb.errors import EXIT_CONNECT, EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_TERMINATED, ChatdbError, one_line

if TYPE_CHECKING:
    from typer._click import Context as ClickContext


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the command stops where it is safe to."""


class TerminatedRead(Terminated, KeyboardInterrupt):
    """SIGTERM outside the batches of archive and purge. A KeyboardInterrupt too, so that
    psycopg cancels the statement it interrupts in the server, as it does for Ctrl-C,
    instead of leaving it to run (a batch's COMMIT in flight is left to finish: see
    cli.lifecycle.Signals)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise TerminatedRead()


class _Process:
    """What the error boundary knows of the process its command runs in."""

    #: The process ends with its command: the console script (``chatdb.cli.main``), not
    #: a program that runs commands in it (Typer's test runner, an embedding).
    ends_with_command = False
    #: Ctrl-C and SIGTERM are ignored up to the process's exit (``ignore_signals_to_the_end``).
    ignoring = False


def ends_with_command() -> None:
    """The process ends with the command it runs (the console script says so)."""
    _Process.ends_with_command = True


def ignore_signals_to_the_end() -> bool:
    """The command's outcome is final (a lifecycle run has recorded it in its audit row):
    in a process that ends with the command, Ctrl-C and SIGTERM are ignored from now to
    its exit, and nothing restores them. What comes after the summary (Typer unwinding,
    the embedded server's hook at exit, which rewrites its list of clients, the
    interpreter's exit) runs with no signal able to end the process with another exit
    code. False, and nothing changed, in a process that goes on after the command: the
    handlers the command found are put back."""
    if not _Process.ends_with_command or threading.current_thread() is not threading.main_thread():
        return False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _Process.ignoring = True
    return True


@contextmanager
def error_boundary(ctx: ClickContext) -> Iterator[None]:
    """Domain errors become one red line and their exit code; Ctrl-C exits 130 and SIGTERM
    143; a reader that went away, 141 quietly; anything else is an internal error, exit 1.
    With --json the error is also the command's one JSON document on stdout."""
    json_command = _command_name(ctx) if _json_requested(ctx) else None
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        try:
            yield
        except Exception as exc:
            # A cleanup that failed while the stack unwound from Ctrl-C or SIGTERM (the
            # rollback of a connection whose COPY the signal cut short: "another command is
            # already in progress") stands for the interruption, not for a new error.
            if (interruption := _interruption(exc)) is not None:
                raise interruption from None
            raise
    except ChatdbError as exc:
        # chatdb's own messages show URLs only as Database.display, and never echo a URL
        # that could not be parsed.
        raise _fail(exc.message, exc.exit_code, exc.hint, json_command, **exc.details()) from None
    except Terminated:
        raise _fail("terminated", EXIT_TERMINATED, json_command=json_command) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED, json_command=json_command) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # Typer's own: an exit code chosen, or bad usage (rendered by main())
    except BrokenPipeError:
        closed_pipe()
    except Exception as exc:
        raise _unexpected(exc, json_command) from None
    finally:
        if in_main_thread and not _Process.ignoring:
            signal.signal(signal.SIGTERM, previous)


def _interruption(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM that ``exc`` was raised while handling, if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt | Terminated):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _unexpected(exc: Exception, json_command: str | None) -> typer.Exit:
    """A driver error that escaped the data layer, or chatdb's own bug. Both are masked:
    the driver's text by structure (the userinfo of any URL, any password= value)."""
    from sqlalchemy.exc import DBAPIError

    from chatdb import citus, db, privileges

    # What Citus refuses for the distribution is said to be that, never blamed on locks.
    if (distributed := citus.distribution_error(exc)) is not None:
        return _fail(db.mask_text(distributed.message), EXIT_PROBLEM, distributed.hint, json_command)
    if isinstance(exc, DBAPIError):
        message = db.mask_text(one_line(exc))
        code = EXIT_CONNECT if exc.connection_invalidated else EXIT_PROBLEM
        hint = privileges.HINT if getattr(exc.orig, "sqlstate", None) == "42501" else None
        return _fail(f"database error: {message}", code, hint, json_command)
    if os.environ.get("CHATDB_DEBUG"):
        traceback.print_exception(exc)
    return _fail(
        f"internal error: {db.mask_text(f'{type(exc).__name__}: {exc}')}",
        EXIT_PROBLEM,
        "set CHATDB_DEBUG=1 for the traceback, and please report it",
        json_command,
    )


def _fail(
    message: str, code: int, hint: str | None = None, json_command: str | None = None, **details: Any
) -> typer.Exit:
    """The error on stderr; with --json, also the one JSON object on stdout (with the
    error's ``details``)."""
    report_error(message, hint)
    if json_command is not None:
        print_json(json_command, False, error=message, exit_code=code, hint=hint, **details)
    return typer.Exit(code)


def _json_requested(ctx: ClickContext) -> bool:
    """Whether the command was given --json."""
    return any("--json" in param.opts and ctx.params.get(param.name or "") for param in ctx.command.params)


def _command_name(ctx: ClickContext | None) -> str:
    """The command as the user typed it, without the program name: "migrate status"."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(names)
