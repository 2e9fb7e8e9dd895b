"""The database options, declared once, and opening the engine.

``--database-url`` and ``--connect-timeout`` are accepted before the command name, between
a group's name and its subcommand (`chatdb migrate --database-url URL status`) and after
the command name; the one given nearest the command wins. A command asks for them with
``command(..., database=True)`` (``chatdb.cli.declare``), which adds them to its options;
``open_engine(ctx, ...)`` reads them from the command's context and those around it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

from rich.text import Text

from chatdb.cli.common import err
from chatdb.cli.options import option
from chatdb.defaults import DEFAULT_CONNECT_TIMEOUT
from chatdb.errors import UsageError

if TYPE_CHECKING:
    from rich.status import Status
    from sqlalchemy import Engine
    from typer._click import Context as ClickContext

    from chatdb import db

#: A day: longer is a typo, and libpq's connect_timeout must stay an integer.
MAX_CONNECT_TIMEOUT = 86_400

DatabaseUrl = Annotated[
    str | None,
    option(
        "--database-url",
        "URL",
        "PostgreSQL URL (postgresql://user:password@host:port/db). "
        "Default: CHATDB_DATABASE_URL, then DATABASE_URL, then the embedded server.",
    ),
]
ConnectTimeout = Annotated[
    float | None,
    option(
        "--connect-timeout",
        "SECONDS",
        # The option's own default is None, so that one given before the command name
        # counts when none comes after it: the help states the timeout that then applies
        # (the bracket escaped, or Rich would read "[default: 10]" as markup and drop it).
        f"Seconds to keep retrying a server that does not answer. \\[default: {DEFAULT_CONNECT_TIMEOUT:g}]",
        min=0,
    ),
]


def with_database_options(fn: Callable[..., Any], *, connect_timeout: bool = True) -> Callable[..., Any]:
    """``fn`` as Typer sees it with --database-url (and --connect-timeout) after its own
    options. Their values stay in the context, where ``open_engine()`` and
    ``configured_url()`` find them; ``fn`` itself does not take them."""
    signature = inspect.signature(fn, eval_str=True)
    added = [
        inspect.Parameter(
            "database_url", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DatabaseUrl
        )
    ]
    if connect_timeout:
        added.append(
            inspect.Parameter(
                "connect_timeout", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConnectTimeout
            )
        )

    @functools.wraps(fn)
    def declared(
        *args: Any, database_url: str | None = None, connect_timeout: float | None = None, **kwargs: Any
    ) -> Any:
        return fn(*args, **kwargs)

    declared.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *added]
    )
    return declared


def _nearest(ctx: ClickContext, name: str) -> Any:
    """An option's value where it was given nearest the command: after the command's name,
    after its group's, then before them."""
    context: ClickContext | None = ctx
    while context is not None:
        value = context.params.get(name)
        if value is not None:
            return value
        context = context.parent
    return None


def configured_url(ctx: ClickContext) -> str | None:
    """The --database-url given, if any (the environment is ``db.resolve_database``'s)."""
    url = _nearest(ctx, "database_url")
    return None if url is None else str(url)


def open_engine(ctx: ClickContext, command: str) -> Engine:
    """Resolve the database (announcing the embedded default), connect, and return the
    engine. Connection problems raise ConnectError (exit 3)."""
    from chatdb import db

    timeout = _nearest(ctx, "connect_timeout")
    if timeout is not None and not 0 <= timeout <= MAX_CONNECT_TIMEOUT:
        raise UsageError(
            f"--connect-timeout must be between 0 and {MAX_CONNECT_TIMEOUT:,} seconds, not {timeout:g}"
        )
    database = db.resolve_database(configured_url(ctx))
    if database.source == "embedded":
        from chatdb import embedded

        # Which folder, and whether it was just created (running elsewhere makes a new one).
        started = embedded.last_started  # set by resolve_database(), which started it
        if started is not None:
            err.print(f"chatdb: {started.describe()}", soft_wrap=True, markup=False)
    timeout = DEFAULT_CONNECT_TIMEOUT if timeout is None else float(timeout)
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
