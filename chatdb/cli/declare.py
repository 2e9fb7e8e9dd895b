"""The one way to declare a command.

Each command group has a module of its own under ``chatdb/cli/`` with a Typer app from
``new_app()``, its commands registered with ``command()`` (and a group's own options with
``callback()``)::

    app = new_app()


    @command(app, "status", database=True)
    def status(ctx: typer.Context, as_json: JsonOutput = False) -> None:
        '''Summary line.

        More paragraphs, then an example.'''
        with disposing(open_engine(ctx, "status")) as engine:
            ...

``chatdb.cli.root`` lists the modules in the order ``chatdb --help`` shows them. Every
command then gets, with nothing more from it:

- the error boundary (``chatdb.cli.boundary``): it raises chatdb's errors, nothing else;
- the database options when it asks for them (``database=True``; see ``chatdb.cli.connect``);
- its docstring as its help, each paragraph flowed to the terminal's width and an example
  (indented lines) kept line by line; the first paragraph is its summary in listings;
- no type label beside a flag (``--json``, not ``--json <bool>``) or an argument
  (``revision``, not ``revision <str>``); an option that takes a value names it
  (``--older-than DURATION``), declared with ``chatdb.cli.options.option()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from chatdb.cli import closed_pipe
from chatdb.cli.boundary import error_boundary
from chatdb.cli.connect import with_database_options
from chatdb.cli.values import convert_plainly

if TYPE_CHECKING:
    from typer._click import Command, Parameter
    from typer._click import Context as ClickContext

F = TypeVar("F", bound=Callable[..., Any])
#: True: --database-url and --connect-timeout; "url": --database-url alone (a command that
#: names the database without connecting to it).
DatabaseOptions = Literal[False, True, "url"]


def new_app() -> typer.Typer:
    """A command group's Typer app. Only the root offers shell completion."""
    return typer.Typer(cls=ChatdbGroup, add_completion=False)


def command(
    app: typer.Typer,
    name: str,
    *,
    database: DatabaseOptions = False,
    doc: str | None = None,
    **settings: Any,
) -> Callable[[F], F]:
    """Register ``fn`` as the command ``name`` of ``app``. Its help is its docstring, or
    ``doc`` where one function is two commands (``chatdb migrate`` and ``migrate up``)."""

    def register(fn: F) -> F:
        shown = help_text(doc or fn.__doc__)
        app.command(name, cls=ChatdbCommand, help=shown, short_help=summary(shown), **settings)(
            _declared(fn, database)
        )
        return fn

    return register


def callback(app: typer.Typer, *, database: DatabaseOptions = False, **settings: Any) -> Callable[[F], F]:
    """Register ``fn`` as the callback of the group ``app``: its own options, and what it
    does without a subcommand when ``invoke_without_command=True``."""

    def register(fn: F) -> F:
        app.callback(help=help_text(fn.__doc__), **settings)(_declared(fn, database))
        return fn

    return register


def _declared(fn: Callable[..., Any], database: DatabaseOptions) -> Callable[..., Any]:
    if not database:
        return fn
    return with_database_options(fn, connect_timeout=database is True)


def help_text(doc: str | None) -> str:
    """A docstring as --help shows it: each paragraph on one line, which Rich then wraps at
    the terminal's width, except an example (indented lines), kept line by line. Examples
    start at the margin: Typer takes the indentation off some and not others."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(
        "\n".join(line.strip() for line in p.splitlines()) if p.startswith(" ") else " ".join(p.split())
        for p in paragraphs
    )


def summary(shown: str) -> str:
    """The first paragraph of a command's help: what listings show."""
    return shown.split("\n\n")[0]


# --- the command classes ------------------------------------------------------------------------

if TYPE_CHECKING:
    _Command = Command  # what the mixins below extend, for the type checker
else:
    _Command = object


class ChatdbHelp(_Command):
    """Help as every chatdb command shows it: no type label beside a flag (Typer labels it
    ``<bool>``, though a flag takes no value) or an argument (``<str>``: its name and help
    say what it is), and 141 when the reader has gone. Its parameters convert their plain
    values without pydantic (``chatdb.cli.values``)."""

    def get_params(self, ctx: ClickContext) -> list[Parameter]:
        params = super().get_params(ctx)
        convert_plainly(params)
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
            elif type(param) is TyperArgument:
                # Typer takes an argument's label from its type alone, never from a metavar.
                param.__class__ = _UnlabelledArgument
        return params

    def get_help(self, ctx: ClickContext) -> str:
        # Typer prints help on a Rich console of its own, which exits 1 when the reader of
        # stdout has gone (`chatdb --help | head -1`); printing help exits in no other way.
        try:
            return super().get_help(ctx)
        except SystemExit:
            closed_pipe()


class _UnlabelledArgument(TyperArgument):
    def display_type_rich(self, ctx: ClickContext) -> str | None:
        return None


class _Boundary(_Command):
    def invoke(self, ctx: ClickContext) -> Any:
        with error_boundary(ctx):
            return super().invoke(ctx)


class ChatdbCommand(_Boundary, ChatdbHelp, TyperCommand):
    """A command: run under the error boundary, with chatdb's help."""


class ChatdbGroup(_Boundary, ChatdbHelp, TyperGroup):
    """A group's boundary covers its own callback (`chatdb migrate` alone upgrades) and its
    subcommand, whose own boundary has already rendered any error of its: an error is
    rendered once."""
