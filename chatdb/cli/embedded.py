"""``chatdb embedded``: the built-in server (``url``, ``stop``)."""

from __future__ import annotations

import typer

from chatdb.cli.common import err, out
from chatdb.cli.declare import callback, command, new_app

app = new_app()


@callback(app)
def embedded_group() -> None:
    """The embedded PostgreSQL that chatdb uses when no database URL is configured. It
    keeps running between commands; its data lives in the nearest .chatdb/ folder (here
    or in a parent folder, else a new one here), or in CHATDB_HOME when set.

    Example:

        chatdb embedded url && chatdb embedded stop
    """


@command(app, "stop")
def stop() -> None:
    """Stop the embedded PostgreSQL server (its data stays in its .chatdb/ folder).

    Example:

        chatdb embedded stop
    """
    from chatdb import embedded

    home = embedded.locate()
    if home.source == "new":
        out.print(f"No embedded PostgreSQL here: no {embedded.FOLDER}/ in this folder or any parent folder.")
    elif embedded.stop(home.path):
        out.print(f"Stopped the embedded PostgreSQL in {home.path}.", markup=False)
    else:
        out.print(f"The embedded PostgreSQL in {home.path} is not running.", markup=False)


@command(app, "url")
def url() -> None:
    """Start the embedded server if needed and print its URL (for psql and friends).

    Example:

        psql "$(chatdb embedded url)"
    """
    from chatdb import embedded

    address = embedded.ensure_running()
    started = embedded.last_started  # set by ensure_running()
    if started is not None and started.created:
        err.print(f"chatdb: {started.describe()}", markup=False)
    typer.echo(address.set(drivername="postgresql").render_as_string(hide_password=False))
