"""The ``chatdb`` command line: one thin function per command (parse, call, render).

A command imports only what it runs. ``chatdb --version`` is answered here, before Typer
is imported; the Typer app (``chatdb.cli.root``) imports a command's module only when
that command runs or shows its own help, and a command's module imports the data layer it
calls (``tests/integration/test_startup.py`` holds them to it).
"""

from __future__ import annotations

import os
import sys
from contextlib import suppress

from chatdb import __version__
from chatdb.errors import EXIT_CLOSED_PIPE

# typing, not imported here: `chatdb --version` would take a third longer to start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from chatdb.cli.root import app as app


def main() -> None:
    """The console script."""
    if sys.argv[1:] == ["--version"]:
        print_version()
        raise SystemExit(0)
    from chatdb.cli.boundary import ends_with_command
    from chatdb.cli.root import run

    ends_with_command()
    raise SystemExit(run())


def print_version() -> None:
    try:
        sys.stdout.write(f"chatdb {__version__}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        closed_pipe()


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


def __getattr__(name: str) -> Any:
    """``chatdb.cli.app``, the Typer app (for tests and for embedding), built on first use."""
    if name == "app":
        from chatdb.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
