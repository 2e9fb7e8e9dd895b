"""The one error type users can act on, and the exit codes (see docs/architecture.md)."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_PROBLEM = 1  # a check found problems, or the database is not in a usable state
EXIT_USAGE = 2  # bad usage or input
EXIT_CONNECT = 3  # the database cannot be reached or refused the login
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: The reader of chatdb's output went away (`chatdb status --json | head -c 10`): what a shell
#: reports for cat or grep killed there by SIGPIPE (128 + 13), so `set -o pipefail` treats chatdb
#: like them; 0 would tell a script that output it never delivered was read.
EXIT_CLOSED_PIPE = 141


class ChatdbError(Exception):
    """A problem the user can fix. The CLI prints the message on one line and exits."""

    exit_code = EXIT_PROBLEM

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def details(self) -> dict[str, Any]:
        """What ``--json`` says of the error besides its message, exit code and hint."""
        return {}


class UsageError(ChatdbError):
    """Bad input: a malformed URL, an unknown revision, an impossible request."""

    exit_code = EXIT_USAGE


class ConnectError(ChatdbError):
    """The server did not answer in time, or refused the login."""

    exit_code = EXIT_CONNECT


class StateError(ChatdbError):
    """The database is not in a state the command can work on."""

    exit_code = EXIT_PROBLEM


class PrivilegeError(StateError):
    """The database role lacks a privilege the command needs."""


def one_line(exc: BaseException) -> str:
    """An error as one line: the driver's message for a database error, whitespace folded."""
    return " ".join(str(getattr(exc, "orig", exc)).split())


def server_message(exc: BaseException) -> str:
    """A database error's own message from the server, on one line, without the excerpt
    of the statement (``LINE 1: ... ^``) that the driver adds to it; ``one_line`` when the
    server gave none."""
    diagnostic = getattr(getattr(exc, "orig", exc), "diag", None)
    primary = getattr(diagnostic, "message_primary", None)
    return " ".join(primary.split()) if primary else one_line(exc)
