"""The ``chatdb`` app: its own options, its commands in the order ``chatdb --help`` lists
them, and the console script's handling of Typer's usage errors.

A command's module is imported when the command runs or shows its help, never to list it:
``COMMANDS`` holds each command's summary for that (a test holds it equal to the first
paragraph of the command's docstring).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from chatdb.cli import closed_pipe, print_version
from chatdb.cli.common import print_json, report_error
from chatdb.cli.declare import ChatdbHelp, callback
from chatdb.errors import EXIT_PROBLEM, EXIT_USAGE

if TYPE_CHECKING:
    from typer._click import Command
    from typer._click import Context as ClickContext


@dataclass(frozen=True)
class Entry:
    name: str
    module: str  # chatdb.cli.<module>, whose Typer app is `app`
    summary: str


#: The commands in the order a user meets them: the schema, data in it, archive and purge
#: that keep it in shape, the proof for CI, a look at what is there, the roles to run it
#: all as. doctor and bench came later and go after grants: they check a database that the
#: commands before them have set up (doctor with the pg_monitor grant that `grants`
#: prints). embedded, which runs the built-in server rather than working on a database,
#: comes last.
COMMANDS = (
    Entry(
        "migrate",
        "migrate",
        "Create and evolve chatdb's schema. Without a subcommand: upgrade the database to head "
        "(or --to REV); running it again is a no-op.",
    ),
    Entry(
        "seed", "seed", "Fill the database with realistic, deterministic fake chat data, loaded with COPY."
    ),
    Entry(
        "archive",
        "archive",
        "Move idle conversations, whole, with all their messages, into the archive tables.",
    ),
    Entry(
        "purge",
        "purge",
        "Enforce retention: permanently delete conversations idle longer than --older-than, with all "
        "their messages, from the hot and the archive tables; and soft-deleted conversations and "
        "messages whose deleted_at is older than --deleted-grace.",
    ),
    Entry(
        "verify-indexes",
        "verify",
        "Prove that every index chatdb expects exists, matches exactly, is valid and serves its "
        "query. Run it in CI after `chatdb migrate`, and before deploys.",
    ),
    Entry(
        "status",
        "status",
        "Server version, schema revision against head, row counts and sizes of chatdb's tables, "
        "and the latest archive/purge runs.",
    ),
    Entry(
        "grants",
        "grants",
        "Print the GRANT statements for the application's role and the operations role. Needs no "
        "database. Run them as the owner of chatdb's tables, after `chatdb migrate`.",
    ),
    Entry(
        "doctor",
        "doctor",
        "What needs attention: seed 000's monitoring and maintenance list, as checks with the "
        "statements that fix them.",
    ),
    Entry(
        "bench",
        "bench",
        "Prove on a live database that the application's queries meet their latency budgets under "
        "concurrent load, also while archive or purge runs.",
    ),
    Entry(
        "embedded",
        "embedded",
        "The embedded PostgreSQL that chatdb uses when no database URL is configured. It keeps "
        "running between commands; its data lives in the nearest .chatdb/ folder (here or in a "
        "parent folder, else a new one here), or in CHATDB_HOME when set.",
    ),
)


class _Deferred(TyperCommand):
    """A command before its module is imported: its name and summary, for listings.
    Parsing its arguments imports the module and hands over to the command declared there."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry.name, help=entry.summary, short_help=entry.summary, add_help_option=False)
        self.entry = entry

    @cached_property
    def declared(self) -> Command:
        module = importlib.import_module(f"chatdb.cli.{self.entry.module}")
        return typer.main.get_command(module.app)

    def make_context(
        self, info_name: str | None, args: list[str], parent: ClickContext | None = None, **extra: Any
    ) -> ClickContext:
        return self.declared.make_context(info_name, args, parent=parent, **extra)


class _Chatdb(ChatdbHelp, TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for entry in COMMANDS:
            self.add_command(_Deferred(entry))


def _version(value: bool) -> None:
    if value:
        print_version()
        raise typer.Exit()


app = typer.Typer(
    name="chatdb",
    cls=_Chatdb,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never print locals (secrets) in a traceback
    context_settings={"help_option_names": ["-h", "--help"]},
)


@callback(app, database=True)
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Admin and operations CLI for the PostgreSQL store of an AI chatbot.

    Example:

        chatdb migrate && chatdb status
    """


def run() -> int:
    """The app as the console script runs it: usage errors, like every other error, are
    one line."""
    if not os.environ.get("CHATDB_DEBUG"):
        # chatdb reports each error itself, on one line. Libraries log their own on the way
        # (psycopg: "error ignored terminating <psycopg.Copy [BAD]>" when a COPY loses its
        # connection), which logging's last-resort handler would print on stderr too.
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        code = _run()
    except BrokenPipeError:  # the JSON of a usage error to a closed pipe
        closed_pipe()
    return code if isinstance(code, int) else 0


def _command_taking(option: str | None) -> str | None:
    """The command named after ``option`` on the command line, when it takes that option."""
    entries = {entry.name: entry for entry in COMMANDS}
    args = sys.argv[1:]
    if option is None or option not in args:
        return None
    named = next((arg for arg in args[args.index(option) + 1 :] if arg in entries), None)
    if named is None:
        return None
    declared = _Deferred(entries[named]).declared
    return named if any(option in param.opts for param in declared.params) else None


def _run() -> object:
    try:
        return app(prog_name="chatdb", standalone_mode=False)
    except typer.TyperException as exc:  # Typer's own errors: bad usage, exit 2, above all
        message = exc.format_message()
        if exc.exit_code != EXIT_USAGE:
            report_error(message)
            return exc.exit_code
        if message:  # empty after printing the help for no arguments
            usage_context = getattr(exc, "ctx", None)  # the command the usage error is about
            command = usage_context.command_path if usage_context is not None else "chatdb"
            hint = f"see `{command} --help`"
            option = getattr(exc, "option_name", None)  # an option Typer does not know here
            named = _command_taking(option) if command == "chatdb" else None
            if option and named:  # `chatdb --json status`: a command's option before its name
                message = f"{option} is an option of `chatdb {named}`: it goes after the command's name"
                command, hint = f"chatdb {named}", f"`chatdb {named} {option} ...`"
            report_error(message, hint)
            if "--json" in sys.argv[1:]:  # the one JSON object, as for every other error
                name = command.removeprefix("chatdb").strip()
                print_json(name, False, error=message, exit_code=EXIT_USAGE, hint=hint)
        return EXIT_USAGE
    except typer.Abort:
        report_error("aborted")
        return EXIT_PROBLEM
